"""Stats (CSV, HTML, Prometheus), the worker CLI, state across reloads,
maxconn limits and the access log."""

from __future__ import annotations

import json
import re
import socket
import time

from worker_harness import http_config, http_get, origin_of
from test_balance import config, srv
from test_http import connect, read_response


def stats_config(front: str, stats: str, servers: list[str]) -> str:
    text = config(front, servers)
    return f"global:\n  stats: {{bind: \"{stats}\"}}\n" + text


def csv_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [line for line in text.splitlines() if line]
    header = lines[0][2:].split(",")
    return {(row[0], row[1]): dict(zip(header, row)) for row in (l.split(",") for l in lines[1:])}


def test_stats_csv_html_metrics_summed_across_workers(backend, bind, run_worker):
    a, b = backend("a"), backend("b")
    front, stats = bind("web"), bind("stats")
    worker = run_worker(stats_config(front, stats, [srv("a", a), srv("b", b)]))
    for _ in range(4):
        assert http_get(front)[0] == 200
    assert http_get(front, "/status/404")[0] == 404

    status, headers, body = http_get(stats, "/;csv")
    assert status == 200
    rows = csv_rows(body.decode())
    assert rows[("web", "FRONTEND")]["req_tot"] == "5"
    assert rows[("web", "FRONTEND")]["hrsp_2xx"] == "4"
    assert rows[("web", "FRONTEND")]["hrsp_4xx"] == "1"
    assert rows[("app", "BACKEND")]["status"] == "UP"
    assert int(rows[("app", "a")]["stot"]) + int(rows[("app", "b")]["stot"]) == 5
    assert int(rows[("app", "a")]["bout"]) > 0
    assert worker.gathers >= 1

    # A second worker of the same generation: the master returns both outputs.
    worker.extra_gather_outputs = [worker.cli("_counters")]
    rows = csv_rows(http_get(stats, "/;csv")[2].decode())
    assert rows[("web", "FRONTEND")]["req_tot"] == "10"

    status, headers, body = http_get(stats, "/metrics")
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert 'hapymaster_frontend_http_requests_total{proxy="web"} 10\n' in text
    assert 'hapymaster_server_status{proxy="app",server="a"} 1\n' in text
    assert 'hapymaster_frontend_http_responses_total{proxy="web",code="4xx"} 2\n' in text
    # Exposition format: every sample belongs to a family announced by HELP and TYPE.
    families = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge")
            families.add(name)
        elif not line.startswith("#"):
            assert re.fullmatch(r'[a-z_]+(\{[a-z_]+="[^"]*"(,[a-z_]+="[^"]*")*\})? \d+', line), line
            assert line.split("{")[0].split(" ")[0] in families
    assert text.endswith("\n")

    worker.extra_gather_outputs = []
    status, headers, body = http_get(stats, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    for word in ("web", "app", "<td class=\"n\">a</td>", "UP"):
        assert word in page
    assert http_get(stats, "/nothing")[0] == 404


def test_runtime_commands(backend, bind, run_worker):
    a, b = backend("a"), backend("b")
    front = bind("web")
    worker = run_worker(config(front, [srv("a", a), srv("b", b)]))
    assert "disable server" in worker.cli("help")
    assert worker.cli("disable server app/b") == "\n"
    assert {origin_of(http_get(front)[2]) for _ in range(4)} == {"a"}
    state = worker.cli("show servers state")
    lines = state.splitlines()
    assert lines[0] == "1" and lines[1].startswith("# be_id be_name srv_id srv_name")
    row_b = next(l.split() for l in lines[2:] if l.split()[3] == "b")
    assert row_b[1] == "app" and row_b[6] == "1"  # srv_admin_state: maintenance
    assert worker.cli("enable server app/b") == "\n"
    assert {origin_of(http_get(front)[2]) for _ in range(4)} == {"a", "b"}
    assert worker.cli("set weight app/a 3") == "\n"
    seen = [origin_of(http_get(front)[2]) for _ in range(8)]
    assert seen.count("a") == 6
    assert csv_rows(worker.cli("show stat"))[("app", "a")]["weight"] == "3"
    assert worker.cli("set server app/a state drain") == "\n"
    assert csv_rows(worker.cli("show stat"))[("app", "a")]["status"] == "DRAIN"
    assert {origin_of(http_get(front)[2]) for _ in range(3)} == {"b"}
    assert worker.cli("set server app/a state ready") == "\n"
    assert worker.cli("disable server app/zzz") == "No such server.\n"
    assert worker.cli("disable server nope/a") == "No such backend.\n"
    assert "expects" in worker.cli("set server app/a state sideways")
    assert "Invalid weight" in worker.cli("set weight app/a 999")


def test_state_carried_to_next_generation(backend, bind, run_worker):
    a, b, c = backend("a"), backend("b"), backend("c")
    front = bind("web")
    fast = "    check: {interval: 100ms, rise: 1, fall: 1, http: \"GET /health\"}"
    text = config(front, [srv("a", a, check=True), srv("b", b, check=True),
                          srv("c", c, check=True)], backend_extra=fast)
    old = run_worker(text)
    old.cli("disable server app/a")
    old.cli("set weight app/b 7")
    c.health_status = 500
    deadline = time.monotonic() + 5
    while csv_rows(old.cli("show stat"))[("app", "c")]["status"] != "DOWN":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    state = json.loads(old.cli("_state"))
    old.proc.terminate()
    old.wait_exit(5)
    # The next generation: a server the new config no longer has is ignored.
    new = run_worker(text + "      - {name: d, address: \"127.0.0.1:9\"}\n", state=state,
                     generation=2)
    rows = csv_rows(new.cli("show stat"))
    assert rows[("app", "a")]["status"] == "MAINT"
    assert rows[("app", "b")]["weight"] == "7"
    assert rows[("app", "c")]["status"] == "DOWN"  # without waiting for `fall` checks
    assert {origin_of(http_get(front)[2]) for _ in range(3)} == {"b"}


def second_waits_for_first(front: str, path: bytes) -> socket.socket:
    """With room for one connection: a second one is not served while the first
    stays open, and is served once it closes. Returns the second, answer pending."""
    first = connect(front)
    f1 = first.makefile("rb")
    first.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(f1)[0] == 200
    second = connect(front)  # the kernel completes it; the worker does not serve it yet
    second.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    second.settimeout(0.4)
    try:
        data = second.recv(100)
    except socket.timeout:
        data = None
    assert data is None
    f1.close()  # a makefile keeps the socket open otherwise
    first.close()
    second.settimeout(5)
    return second


def test_frontend_maxconn_stops_accepting_without_dropping(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)], extra_frontend="    maxconn: 1"))
    second = second_waits_for_first(front, b"/2")
    status, _, body = read_response(second.makefile("rb"))
    assert status == 200 and json.loads(body)["path"] == "/2"
    second.close()


def test_global_maxconn(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)], extra_global="  maxconn: 1"))
    second = second_waits_for_first(front, b"/")
    assert read_response(second.makefile("rb"))[0] == 200
    second.close()


def test_access_log_line(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    http_get(front, "/logged?x=1")
    deadline = time.monotonic() + 3
    pattern = re.compile(r'127\.0\.0\.1:\d+ \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3}\] web app/a '
                         r'\d+/\d+/\d+/\d+/\d+ 200 \d+ - - ---- \d+/\d+/\d+/\d+/0 0/0 '
                         r'"GET /logged\?x=1 HTTP/1\.1"')
    while not pattern.search(worker.log):
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.05)


def test_access_log_off(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)], extra_defaults="  access_log: false"))
    assert http_get(front, "/quiet")[0] == 200
    worker.cli("show info")  # a round trip through the worker after the request
    time.sleep(0.1)
    assert "/quiet" not in worker.log
