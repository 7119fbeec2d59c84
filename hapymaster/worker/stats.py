"""Statistics: HAProxy-like CSV (``show stat``, ``/;csv``), an HTML page
(``/``) and Prometheus text exposition (``/metrics``) on ``global.stats.bind``.

Counters live in each worker (``export_counters``, the hidden ``_counters``
command). The stats page asks the master to gather them: the master asks
every live worker, old generations included, and adds what the workers gone
had counted (``hapymaster.counters``), so the totals run on across reloads
and never go down. States (UP/DOWN/MAINT) are the answering worker's own view.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import httptools

from hapymaster.counters import merge
from hapymaster.worker.balance import COUNTER_FIELDS

if TYPE_CHECKING:
    from hapymaster.worker.process import Worker

log = logging.getLogger("hapymaster.worker")

# HAProxy's CSV columns, in HAProxy's order, up to the ones we fill.
CSV_FIELDS = ("pxname", "svname", "qcur", "qmax", "scur", "smax", "slim", "stot", "bin", "bout",
              "dreq", "dresp", "ereq", "econ", "eresp", "wretr", "wredis", "status", "weight",
              "act", "bck", "chkfail", "chkdown", "lastchg", "downtime", "qlimit", "pid", "iid",
              "sid", "throttle", "lbtot", "tracked", "type", "rate", "rate_lim", "rate_max",
              "check_status", "check_code", "check_duration", "hrsp_1xx", "hrsp_2xx",
              "hrsp_3xx", "hrsp_4xx", "hrsp_5xx", "hrsp_other", "hanafail", "req_rate",
              "req_rate_max", "req_tot", "cli_abrt", "srv_abrt")


def export_counters(worker: "Worker") -> dict[str, Any]:
    """This worker's counters and gauges, as ``_counters`` returns them."""
    frontends = {}
    for fe in worker.frontends:
        item = fe.counters.as_dict()
        item["scur"] = fe.cur
        frontends[fe.name] = item
    backends = {}
    for backend in worker.backends.values():
        item = backend.counters.as_dict()
        item["scur"] = backend.cur
        item["qcur"] = len(backend.queue)
        servers = {}
        for s in backend.servers:
            sitem = s.counters.as_dict()
            sitem["scur"] = s.cur
            servers[s.name] = sitem
        item["servers"] = servers
        backends[backend.name] = item
    return {"pid": os.getpid(), "frontends": frontends, "backends": backends}


def own_counters(worker: "Worker") -> dict[str, Any]:
    """Just this worker's counters, in the shape ``gathered_counters`` returns."""
    totals = merge([export_counters(worker)])
    totals["workers"] = 1
    return totals


async def gathered_counters(worker: "Worker") -> dict[str, Any]:
    """Everything served since the master started: every worker, every generation.

    The master answers with one part, already summed (``hapymaster.counters``)
    and saying how many workers it covers; a master older than that answers
    with one part per current worker. If it cannot answer at all, the page
    shows this worker's own counters rather than nothing.
    """
    outputs = None
    if worker.control is not None:
        outputs = await worker.control.gather("_counters")
    parts = []
    for text in outputs or []:
        try:
            parts.append(json.loads(text))
        except ValueError:
            continue
    if not parts:
        return own_counters(worker)
    totals = merge(parts)
    totals["workers"] = sum(int(part.get("workers", 1)) for part in parts)
    return totals


def _rows(worker: "Worker", totals: dict[str, Any]) -> list[dict[str, Any]]:
    """One dict per CSV line: FRONTEND, each server, BACKEND, like HAProxy."""
    rows = []
    now = time.time()
    pid = os.getpid()
    for fe in worker.frontends:
        c = totals["frontends"].get(fe.name, {})
        row = {k: c.get(k, 0) for k in COUNTER_FIELDS}
        row.update(pxname=fe.name, svname="FRONTEND", scur=c.get("scur", 0), slim=fe.maxconn,
                   status="OPEN" if not worker.stopping else "STOP", pid=pid, iid=fe.fid, sid=0,
                   type=0)
        rows.append(row)
    for backend in worker.backends.values():
        bt = totals["backends"].get(backend.name, {"servers": {}})
        for s in backend.servers:
            c = bt["servers"].get(s.name, {})
            row = {k: c.get(k, 0) for k in COUNTER_FIELDS}
            row.update(pxname=backend.name, svname=s.name, scur=c.get("scur", 0),
                       slim=s.maxconn or "", status=s.status_text if s.checked or
                       s.admin != "ready" else ("no check" if s.up else "DOWN"),
                       weight=s.weight, act=0 if s.backup else 1, bck=1 if s.backup else 0,
                       lastchg=int(now - s.last_change), pid=pid, iid=backend.bid, sid=s.sid,
                       type=2, check_status=s.check_status if s.checked else "",
                       check_code=s.check_code or "" if s.checked else "",
                       check_duration=s.check_duration_ms if s.checked and
                       s.check_duration_ms >= 0 else "", qcur="", qlimit="")
            if s.admin == "ready" and s.up and not s.checked:
                row["status"] = "no check" if False else "UP"
            rows.append(row)
        row = {k: bt.get(k, 0) for k in COUNTER_FIELDS}
        row.update(pxname=backend.name, svname="BACKEND", qcur=bt.get("qcur", 0),
                   scur=bt.get("scur", 0), status="UP" if backend.is_up else "DOWN",
                   weight=sum(s.weight for s in backend.servers if s.usable),
                   act=sum(1 for s in backend.servers if s.usable and not s.backup),
                   bck=sum(1 for s in backend.servers if s.usable and s.backup),
                   lastchg=int(now - backend.last_change), pid=pid, iid=backend.bid, sid=0,
                   type=1)
        rows.append(row)
    return rows


def render_csv(worker: "Worker", totals: dict[str, Any] | None) -> str:
    if totals is None:
        totals = own_counters(worker)
    lines = ["# " + ",".join(CSV_FIELDS)]
    for row in _rows(worker, totals):
        lines.append(",".join(str(row.get(field, "")) for field in CSV_FIELDS))
    return "\n".join(lines) + "\n\n"


def _escape(text: str) -> str:
    """``html.escape(text)``: the same five replacements. Importing html would
    cost every worker its entity tables (0.3 MiB of idle RSS, bench/worker_rss.py)."""
    return (text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
            .replace('"', "&quot;").replace("'", "&#x27;"))


def render_html(worker: "Worker", totals: dict[str, Any]) -> str:
    esc = _escape
    rows = _rows(worker, totals)
    out = ["<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
           "<title>hapymaster statistics</title><style>"
           "body{font-family:sans-serif;font-size:13px}table{border-collapse:collapse;"
           "margin-bottom:1.5em}td,th{border:1px solid #999;padding:2px 6px;text-align:right}"
           "th{background:#20407a;color:#fff}td.n{text-align:left}.UP{background:#c0ffc0}"
           ".DOWN{background:#ffc0c0}.MAINT{background:#c0c0ff}.DRAIN{background:#ffd080}"
           "</style></head><body>",
           f"<h1>hapymaster statistics</h1><p>pid {os.getpid()}, generation "
           f"{worker.generation}, {totals.get('workers', 1)} worker(s) summed, uptime "
           f"{int(time.time() - worker.started)}s</p>"]
    columns = (("svname", "Name"), ("status", "Status"), ("weight", "Weight"),
               ("qcur", "Queue"), ("scur", "Sessions"), ("smax", "Max"), ("stot", "Total"),
               ("bin", "Bytes in"), ("bout", "Bytes out"), ("req_tot", "Requests"),
               ("hrsp_2xx", "2xx"), ("hrsp_3xx", "3xx"), ("hrsp_4xx", "4xx"),
               ("hrsp_5xx", "5xx"), ("econ", "Conn errors"), ("eresp", "Resp errors"),
               ("check_status", "Check"), ("chkfail", "Chk fail"), ("lastchg", "Last change"))
    current = None
    for row in rows:
        if row["pxname"] != current:
            if current is not None:
                out.append("</table>")
            current = row["pxname"]
            out.append(f"<h2>{esc(current)}</h2><table><tr>")
            out.extend(f"<th>{esc(title)}</th>" for _, title in columns)
            out.append("</tr>")
        status = str(row.get("status", ""))
        out.append(f"<tr class=\"{esc(status.split()[0] if status else '')}\">")
        for key, _ in columns:
            cls = " class=\"n\"" if key == "svname" else ""
            out.append(f"<td{cls}>{esc(str(row.get(key, '')))}</td>")
        out.append("</tr>")
    if current is not None:
        out.append("</table>")
    out.append("</body></html>\n")
    return "".join(out)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


# (metric suffix, CSV field, type, help)
_FRONTEND_METRICS = (
    ("current_sessions", "scur", "gauge", "Current number of active sessions."),
    ("max_sessions", "smax", "gauge", "Maximum observed number of active sessions."),
    ("limit_sessions", "slim", "gauge", "Configured session limit."),
    ("sessions_total", "stot", "counter", "Total number of sessions."),
    ("bytes_in_total", "bin", "counter", "Current total of incoming bytes."),
    ("bytes_out_total", "bout", "counter", "Current total of outgoing bytes."),
    ("request_errors_total", "ereq", "counter", "Total number of request errors."),
    ("http_requests_total", "req_tot", "counter", "Total number of HTTP requests received."),
)
_BACKEND_METRICS = (
    ("status", "status", "gauge", "Current status of the service (1 = UP, 0 = DOWN)."),
    ("current_queue", "qcur", "gauge", "Current number of queued requests."),
    ("max_queue", "qmax", "gauge", "Maximum observed number of queued requests."),
    ("current_sessions", "scur", "gauge", "Current number of active sessions."),
    ("max_sessions", "smax", "gauge", "Maximum observed number of active sessions."),
    ("sessions_total", "stot", "counter", "Total number of sessions."),
    ("bytes_in_total", "bin", "counter", "Current total of incoming bytes."),
    ("bytes_out_total", "bout", "counter", "Current total of outgoing bytes."),
    ("connection_errors_total", "econ", "counter", "Total number of connection errors."),
    ("response_errors_total", "eresp", "counter", "Total number of response errors."),
    ("retry_warnings_total", "wretr", "counter", "Total number of retry warnings."),
    ("http_requests_total", "req_tot", "counter", "Total number of HTTP requests."),
    ("active_servers", "act", "gauge", "Current number of active servers."),
    ("backup_servers", "bck", "gauge", "Current number of backup servers."),
    ("weight", "weight", "gauge", "Service weight."),
)
_SERVER_METRICS = (
    ("status", "status", "gauge", "Current status of the service (1 = UP, 0 = DOWN)."),
    ("current_sessions", "scur", "gauge", "Current number of active sessions."),
    ("max_sessions", "smax", "gauge", "Maximum observed number of active sessions."),
    ("sessions_total", "stot", "counter", "Total number of sessions."),
    ("bytes_in_total", "bin", "counter", "Current total of incoming bytes."),
    ("bytes_out_total", "bout", "counter", "Current total of outgoing bytes."),
    ("connection_errors_total", "econ", "counter", "Total number of connection errors."),
    ("response_errors_total", "eresp", "counter", "Total number of response errors."),
    ("check_failures_total", "chkfail", "counter", "Total number of failed checks."),
    ("check_up_down_total", "chkdown", "counter", "Total number of UP->DOWN transitions."),
    ("weight", "weight", "gauge", "Service weight."),
    ("loadbalanced_total", "lbtot", "counter",
     "Total number of times a service was selected."),
)


def render_metrics(worker: "Worker", totals: dict[str, Any]) -> str:
    rows = _rows(worker, totals)
    out: list[str] = []

    def family(prefix: str, metrics: tuple, selected: list[dict[str, Any]], labels) -> None:
        for suffix, field, kind, help_text in metrics:
            name = f"hapymaster_{prefix}_{suffix}"
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            for row in selected:
                value = row.get(field, 0)
                if field == "status":
                    value = 1 if str(value).startswith("UP") or value == "OPEN" else 0
                if value == "" or value is None:
                    value = 0
                out.append(f"{name}{{{labels(row)}}} {value}")

    fes = [r for r in rows if r["svname"] == "FRONTEND"]
    bes = [r for r in rows if r["svname"] == "BACKEND"]
    srvs = [r for r in rows if r["type"] == 2]
    family("frontend", _FRONTEND_METRICS, fes, lambda r: f'proxy="{_label(r["pxname"])}"')
    for code in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
        pass
    name = "hapymaster_frontend_http_responses_total"
    out.append(f"# HELP {name} Total number of HTTP responses.")
    out.append(f"# TYPE {name} counter")
    for row in fes:
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
            out.append(f'{name}{{proxy="{_label(row["pxname"])}",code="{code}"}} '
                       f'{row.get("hrsp_" + code, 0)}')
    family("backend", _BACKEND_METRICS, bes, lambda r: f'proxy="{_label(r["pxname"])}"')
    name = "hapymaster_backend_http_responses_total"
    out.append(f"# HELP {name} Total number of HTTP responses.")
    out.append(f"# TYPE {name} counter")
    for row in bes:
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
            out.append(f'{name}{{proxy="{_label(row["pxname"])}",code="{code}"}} '
                       f'{row.get("hrsp_" + code, 0)}')
    family("server", _SERVER_METRICS, srvs,
           lambda r: f'proxy="{_label(r["pxname"])}",server="{_label(r["svname"])}"')
    name = "hapymaster_server_http_responses_total"
    out.append(f"# HELP {name} Total number of HTTP responses.")
    out.append(f"# TYPE {name} counter")
    for row in srvs:
        for code in ("1xx", "2xx", "3xx", "4xx", "5xx", "other"):
            out.append(f'{name}{{proxy="{_label(row["pxname"])}",server="{_label(row["svname"])}"'
                       f',code="{code}"}} {row.get("hrsp_" + code, 0)}')
    name = "hapymaster_process_workers"
    out.append(f"# HELP {name} Number of workers whose counters are summed here.")
    out.append(f"# TYPE {name} gauge")
    out.append(f"{name} {totals.get('workers', 1)}")
    return "\n".join(out) + "\n"


class StatsHttp(asyncio.Protocol):
    """A tiny HTTP/1.1 server for the stats page; not on the proxy's hot path."""

    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.method = b""
        self.keep_alive = False
        self.busy = False
        self.deadline = 0.0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.worker.sessions.add(self)
        self.deadline = self.worker.now + 30.0

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.session_closed(self)

    def expire(self, now: float) -> None:
        if now >= self.deadline and not self.busy:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def soft_stop(self) -> None:
        if not self.busy:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        self.method = self.parser.get_method()
        self.keep_alive = self.parser.should_keep_alive()
        url, self.url = self.url, b""
        self.busy = True
        self.transport.pause_reading()
        asyncio.ensure_future(self._answer(url.decode("latin-1")))

    async def _answer(self, url: str) -> None:
        try:
            path, _, query = url.partition("?")
            if path in ("/", "/;csv", "/metrics", "/;up") or path.endswith(";csv"):
                totals = await gathered_counters(self.worker)
                if path == "/metrics":
                    body = render_metrics(self.worker, totals).encode()
                    ctype = b"text/plain; version=0.0.4; charset=utf-8"
                elif path.endswith(";csv") or query == "csv":
                    body = render_csv(self.worker, totals).encode()
                    ctype = b"text/plain; charset=utf-8"
                else:
                    body = render_html(self.worker, totals).encode()
                    ctype = b"text/html; charset=utf-8"
                status = b"200 OK"
            else:
                body = b"<html><body><h1>404 Not Found</h1>\n</body></html>\n"
                ctype = b"text/html"
                status = b"404 Not Found"
        except Exception:  # noqa: BLE001 - a stats bug must not kill the worker
            log.exception("stats page failed")
            body, ctype, status = b"internal error\n", b"text/plain", b"500 Internal Server Error"
        if self.transport is None or self.transport.is_closing():
            return
        keep = self.keep_alive and not self.worker.stopping
        head = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\ncache-control: no-cache\r\n%s\r\n" % (
            status, ctype, len(body), b"" if keep else b"connection: close\r\n")
        self.transport.write(head + (b"" if self.method == b"HEAD" else body))
        self.busy = False
        self.deadline = self.worker.now + 30.0
        if keep:
            self.transport.resume_reading()
        else:
            self.transport.close()
