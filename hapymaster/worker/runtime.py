"""The worker CLI (reached through the master: ``@1 show info``) and the
runtime state a worker hands to the next generation.

Answers are text, newline-terminated; a successful change answers an empty
line, like HAProxy's CLI. ``_state`` and ``_counters`` are hidden commands
for the master: the state handed to the next generation, and this worker's
counters, which the master sums across workers and reloads for the stats.
"""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from hapymaster import __version__ as VERSION
from hapymaster.worker.balance import ADMIN_STATES, ServerState

if TYPE_CHECKING:
    from hapymaster.worker.process import Worker

HELP = """\
The following commands are valid at this level:
  help                                    : this message
  show info                               : report information about the running process
  show stat                               : report counters for each proxy and server (CSV)
  show servers state [<backend>]          : dump volatile server information
  disable server <backend>/<server>       : put the server in maintenance
  enable server <backend>/<server>        : take the server out of maintenance
  set weight <backend>/<server> <weight>  : change a server's weight (0-256, or N%)
  set server <backend>/<server> state ready|drain|maint : change a server's admin state
"""


async def execute(worker: "Worker", line: str) -> str:
    words = line.split()
    if not words:
        return "\n"
    if words[0] == "help":
        return HELP
    if words[:2] == ["show", "info"]:
        return show_info(worker)
    if words[:2] == ["show", "stat"]:
        from hapymaster.worker.stats import render_csv
        return render_csv(worker, None)
    if words[:3] == ["show", "servers", "state"]:
        return show_servers_state(worker, words[3] if len(words) > 3 else None)
    if words[0] in ("disable", "enable") and len(words) >= 2 and words[1] == "server":
        if len(words) != 3:
            return "Require 'backend/server'.\n"
        server, error = find_server(worker, words[2])
        if server is None:
            return error
        server.set_admin("maint" if words[0] == "disable" else "ready")
        return "\n"
    if words[:2] == ["set", "weight"]:
        if len(words) != 4:
            return "Require 'backend/server' and 'weight' or 'weight%'.\n"
        server, error = find_server(worker, words[2])
        if server is None:
            return error
        text = words[3]
        try:
            if text.endswith("%"):
                weight = int(server.initial_weight * int(text[:-1]) / 100)
            else:
                weight = int(text)
        except ValueError:
            return "Invalid weight: expected an integer 0-256 or a percentage.\n"
        if not 0 <= weight <= 256:
            return "Invalid weight: must be between 0 and 256.\n"
        server.set_weight(weight)
        return "\n"
    if words[:2] == ["set", "server"]:
        if len(words) != 5 or words[3] != "state" or words[4] not in ADMIN_STATES:
            return "'set server <b>/<s> state' expects 'ready', 'drain' and 'maint'.\n"
        server, error = find_server(worker, words[2])
        if server is None:
            return error
        server.set_admin(words[4])
        return "\n"
    if words[0] == "_state":
        return json.dumps(export_state(worker), separators=(",", ":")) + "\n"
    if words[0] == "_counters":
        from hapymaster.worker.stats import export_counters
        return json.dumps(export_counters(worker), separators=(",", ":")) + "\n"
    return f"Unknown command: '{line.strip()}'. Type 'help' for the list of commands.\n"


def find_server(worker: "Worker", name: str) -> tuple[ServerState | None, str]:
    backend_name, sep, server_name = name.partition("/")
    if not sep:
        return None, "Require 'backend/server'.\n"
    backend = worker.backends.get(backend_name)
    if backend is None:
        return None, "No such backend.\n"
    server = backend.by_name.get(server_name)
    if server is None:
        return None, "No such server.\n"
    return server, ""


def show_info(worker: "Worker") -> str:
    uptime = int(time.time() - worker.started)
    days, rest = divmod(uptime, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    requests = sum(fe.counters.req_tot for fe in worker.frontends)
    lines = [
        ("Name", "hapymaster"),
        ("Version", VERSION),
        ("Pid", os.getpid()),
        ("Master_pid", worker.master_pid),
        ("Generation", worker.generation),
        ("Process_num", worker.index),
        ("Uptime", f"{days}d {hours}h{minutes:02d}m{seconds:02d}s"),
        ("Uptime_sec", uptime),
        ("Maxconn", worker.maxconn),
        ("CurrConns", worker.cur_conns),
        ("CumConns", worker.cum_conns),
        ("CumReq", requests),
        ("DroppedLogs", worker.access_log.dropped),
        ("Stopping", 1 if worker.stopping else 0),
        ("Frontends", len(worker.frontends)),
        ("Backends", len(worker.backends)),
        ("Servers", sum(len(b.servers) for b in worker.backends.values())),
    ]
    return "".join(f"{key}: {value}\n" for key, value in lines)


# HAProxy's "show servers state" columns (format version 1), the ones we have.
_STATE_HEADER = ("# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state "
                 "srv_uweight srv_iweight srv_time_since_last_change srv_check_status "
                 "srv_check_result srv_check_health srv_check_state srv_agent_state "
                 "bk_f_forced_id srv_f_forced_id srv_fqdn srv_port")
_ADMIN_BITS = {"ready": 0, "maint": 1, "drain": 8}


def show_servers_state(worker: "Worker", only: str | None) -> str:
    if only is not None and only not in worker.backends:
        return "Can't find backend.\n"
    out = ["1", _STATE_HEADER]
    now = time.time()
    for backend in worker.backends.values():
        if only is not None and backend.name != only:
            continue
        for s in backend.servers:
            op_state = 2 if s.up else 0
            check_state = 6 if s.checked else 0
            health = (s.check_rise if not s.up else
                      (backend.check.rise if backend.check else 2) + (
                          (backend.check.fall if backend.check else 3) - 1) - s.check_fall)
            out.append(" ".join(str(x) for x in (
                backend.bid, backend.name, s.sid, s.name, s.host, op_state,
                _ADMIN_BITS[s.admin], s.weight, s.initial_weight, int(now - s.last_change),
                s.check_code, 1 if not s.checked else (3 if s.up else 2), health, check_state,
                0, 0, 0, "-", s.port)))
    return "\n".join(out) + "\n"


def export_state(worker: "Worker") -> dict[str, Any]:
    """What the next generation should start from: admin state, runtime weights, health."""
    backends: dict[str, Any] = {}
    for backend in worker.backends.values():
        servers = {}
        for s in backend.servers:
            servers[s.name] = {
                "admin": s.admin,
                "weight": s.weight if s.weight_set_at_runtime else None,
                "up": s.up,
                "checked": s.checked,
                "check_status": s.check_status,
                "last_change": s.last_change,
            }
        backends[backend.name] = {"servers": servers}
    return {"version": 1, "backends": backends}


def apply_state(worker: "Worker", state: Any) -> None:
    """Start from the previous generation's state where the backend/server still exists."""
    if not isinstance(state, dict):
        return
    for name, data in (state.get("backends") or {}).items():
        backend = worker.backends.get(name)
        if backend is None or not isinstance(data, dict):
            continue
        for server_name, item in (data.get("servers") or {}).items():
            server = backend.by_name.get(server_name)
            if server is None or not isinstance(item, dict):
                continue
            if item.get("admin") in ADMIN_STATES:
                server.admin = item["admin"]
            weight = item.get("weight")
            if isinstance(weight, int) and 0 <= weight <= 256:
                server.weight = weight
                server.weight_set_at_runtime = True
            # Health only means something if both generations check the server.
            if server.checked and item.get("checked") and isinstance(item.get("up"), bool):
                server.up = item["up"]
                if not server.up:
                    server.down_since = time.time()
                server.check_status = str(item.get("check_status") or "")
            if isinstance(item.get("last_change"), (int, float)):
                server.last_change = float(item["last_change"])
        backend.changed()
