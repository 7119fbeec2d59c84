"""What one access log record costs the worker, in-process (not a test).

    .venv/bin/python bench/accesslog_cost.py [-n 200000]

Times are this thread's CPU time (time.thread_time), best of several runs: on a
shared machine wall time mostly measures the neighbours.

- ``before``: the path as it was until the accesslog module: the httplog
  line built with f-strings in ``HttpClient._log_line``, then
  ``logging.info(line, extra=...)`` through the handler sdnotify installs
  for stderr (written to /dev/null here).
- ``request path``: ``HttpClient._log_line`` as it is now, with a batch
  already armed: what the request pays (the values handed over, one append).
- ``total, batch of B``: records logged B per event-loop iteration in a real
  (uv)loop, each iteration's flush included (formatting, one write or B
  datagrams), minus the same loop with nothing logged; per record.

Sinks: ``stderr`` is a StreamSink on /dev/null (the write syscall is real);
``journal`` sends datagrams to a unix datagram socket this script reads.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hapymaster import sdnotify  # noqa: E402
from hapymaster.worker.accesslog import AccessLog, JournalSink, StreamSink, worker_fields  # noqa: E402
from hapymaster.worker.proxy_http import HttpClient, Request  # noqa: E402

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def fixtures(loop: asyncio.AbstractEventLoop, access_log: AccessLog | None):
    backend = SimpleNamespace(name="app", cur=3, queue=[])
    server = SimpleNamespace(name="s1", cur=2)
    fe = SimpleNamespace(name="web", cur=5)
    worker = SimpleNamespace(clock=loop.time, loop=loop, cur_conns=5, access_log=access_log)
    client = SimpleNamespace(w=worker, fe=fe, peer=("127.0.0.1", 51234))
    t = loop.time()
    req = Request(t)
    req.t_head = t + 0.0001
    req.t_queue = t + 0.0001
    req.t_connect = t + 0.0002
    req.t_response = t + 0.0005
    req.status = 200
    req.bytes_out = 312
    req.backend = backend
    req.method = b"GET"
    req.url = b"/small"
    return client, req, server


# --- the path before: proxy_http._log_line and _log_date as of bdd7dd4 ----------

_last_log_second = 0
_last_log_date = ""
access_log = logging.getLogger("hapymaster.access")


def _log_date() -> str:
    global _last_log_second, _last_log_date
    now = time.time()
    second = int(now)
    if second != _last_log_second:
        _last_log_second = second
        _last_log_date = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(now))
    return f"{_last_log_date}.{int((now - second) * 1000):03d}"


def log_line_before(self, req, server) -> None:
    now = self.w.loop.time()
    start = req.t_start

    def ms(t: float, base: float) -> int:
        return -1 if t < 0 else int((t - base) * 1000)

    t_req = ms(req.t_head, start)
    t_wait = ms(req.t_queue, req.t_head) if req.t_head >= 0 else -1
    t_conn = ms(req.t_connect, req.t_queue) if req.t_queue >= 0 else -1
    t_resp = ms(req.t_response, req.t_connect) if req.t_connect >= 0 else -1
    t_all = int((now - start) * 1000)
    backend = req.backend.name if req.backend is not None else self.fe.name
    server_name = server.name if server is not None else "<NOSRV>"
    method = req.method.decode("latin-1") if req.method else "<BADREQ>"
    line = (f"{self.peer[0]}:{self.peer[1]} [{_log_date()}] {self.fe.name} "
            f"{backend}/{server_name} {t_req}/{t_wait}/{t_conn}/{t_resp}/{t_all} "
            f"{req.status or -1} {req.bytes_out} - - {req.term}-- "
            f"{self.w.cur_conns}/{self.fe.cur}/{req.backend.cur if req.backend else 0}/"
            f"{server.cur if server else 0}/{req.retries} 0/"
            f"{len(req.backend.queue) if req.backend else 0} "
            f"\"{method} {req.url.decode('latin-1')} HTTP/{req.version}\"")
    access_log.info(line, extra={
        "HAPYMASTER_FRONTEND": self.fe.name, "HAPYMASTER_BACKEND": backend,
        "HAPYMASTER_SERVER": server_name, "HAPYMASTER_STATUS": str(req.status),
        "HAPYMASTER_CLIENT": self.peer[0]})


def per_call(fn, n: int) -> float:
    best = float("inf")
    for _ in range(5):
        start = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, time.thread_time() - start)
    return best / n * 1e6


def bench_before(loop, n: int) -> float:
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        sdnotify.setup_logging("worker", 1)
        client, req, server = fixtures(loop, None)
        return per_call(lambda: log_line_before(client, req, server), n)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def bench_request_path(loop, sink, n: int) -> float:
    log = AccessLog(loop, sink)
    client, req, server = fixtures(loop, log)
    log.armed = True    # a batch is open: what every record after the first pays

    def one() -> None:
        HttpClient._log_line(client, req, server)
        if len(log.records) > 200:
            log.records.clear()
    return per_call(one, n)


def bench_total(loop, sink, n: int, batch: int) -> float:
    log = AccessLog(loop, sink)
    client, req, server = fixtures(loop, log)
    rounds = n // batch

    async def run(logging_on: bool) -> float:
        start = time.thread_time()
        for _ in range(rounds):
            if logging_on:
                for _ in range(batch):
                    HttpClient._log_line(client, req, server)
            await asyncio.sleep(0)
        return time.thread_time() - start

    best_on = min(loop.run_until_complete(run(True)) for _ in range(3))
    best_off = min(loop.run_until_complete(run(False)) for _ in range(3))
    assert not log.records and log.dropped == 0, (len(log.records), log.dropped)
    return (best_on - best_off) / (rounds * batch) * 1e6


# --- the whole request, in-process ------------------------------------------------

# What wrk sends and what nginx answers in bench/run's http-keepalive scenario.
WRK_REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
NGINX_ANSWER = (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 14:00:00 GMT\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 90\r\nConnection: keep-alive\r\n"
                b"\r\n" + b"x" * 89 + b"\n")


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def write(self, data) -> None:
        pass

    def writelines(self, data) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        self.closing = True


HARNESS_CONFIG = """
frontends:
  - name: web
    bind: ["127.0.0.1:18080"]
    default_backend: app
    access_log: %s
backends:
  - name: app
    servers: [{name: s1, address: "127.0.0.1:18081"}]
"""


def bench_harness(loop, sink, access_log_on: bool, n: int, per_iteration: int) -> float:
    """us of CPU per keep-alive request: HttpClient + HttpServer on fake transports."""
    from hapymaster.config import parse_config
    from hapymaster.worker.process import Worker
    from hapymaster.worker.proxy_http import HttpServer

    config = parse_config(HARNESS_CONFIG % ("true" if access_log_on else "false"), "bench")
    log = AccessLog(loop, sink)
    worker = Worker(config, loop, 1, access_log=log)
    fe = worker.frontends[0]
    server = worker.backends["app"].servers[0]
    client = HttpClient(worker, fe)
    client.connection_made(FakeTransport())
    conn = HttpServer(worker, server)
    conn.connection_made(FakeTransport())
    conn.make_idle(server)
    rounds = n // per_iteration

    async def run() -> float:
        start = time.thread_time()
        for _ in range(rounds):
            for _ in range(per_iteration):
                client.data_received(WRK_REQUEST)
                server_conn = client.srv
                server_conn.data_received(NGINX_ANSWER)
            await asyncio.sleep(0)
        return time.thread_time() - start

    best = min(loop.run_until_complete(run()) for _ in range(5))
    assert fe.counters.req_tot == 5 * rounds * per_iteration, fe.counters.req_tot
    assert not log.records and log.dropped == 0
    return best / (rounds * per_iteration) * 1e6


def bench_alternatives(n: int) -> None:
    """The ways of building the line that were tried (format() uses the first)."""
    ip, port, day, ms, fe, be, srv = "127.0.0.1", 51234, "02/Dec/2026:14:15:00", 123.4, "web", \
        "app", "s1"
    t0, th, tq, tc, tr, te = 1000.0, 1000.0001, 1000.0001, 1000.0002, 1000.0005, 1000.0006
    status, out, term, ac, fc, bc, sc, rc, q = 200, 312, "--", 5, 5, 3, 2, 0, 0
    method, url, version = "GET", "/small", "1.1"
    segments: dict[tuple[str, str, str], str] = {}

    def percent() -> str:
        return ('%s:%d [%s.%03d] %s %s/%s %d/%d/%d/%d/%d %d %d - - %s-- %d/%d/%d/%d/%d 0/%d '
                '"%s %s HTTP/%s"' % (
                    ip, port, day, ms, fe, be, srv, (th - t0) * 1000, (tq - th) * 1000,
                    (tc - tq) * 1000, (tr - tc) * 1000, (te - t0) * 1000, status, out, term, ac,
                    fc, bc, sc, rc, q, method, url, version))

    def fstring() -> str:
        return (f'{ip}:{port} [{day}.{int(ms):03d}] {fe} {be}/{srv} {int((th - t0) * 1000)}/'
                f'{int((tq - th) * 1000)}/{int((tc - tq) * 1000)}/{int((tr - tc) * 1000)}/'
                f'{int((te - t0) * 1000)} {status} {out} - - {term}-- {ac}/{fc}/{bc}/{sc}/{rc} '
                f'0/{q} "{method} {url} HTTP/{version}"')

    def prefix() -> str:
        key = (fe, be, srv)
        names = segments.get(key)
        if names is None:
            names = segments[key] = "%s %s/%s" % key
        return ('%s:%d [%s.%03d] %s %d/%d/%d/%d/%d %d %d - - %s-- %d/%d/%d/%d/%d 0/%d '
                '"%s %s HTTP/%s"' % (
                    ip, port, day, ms, names, (th - t0) * 1000, (tq - th) * 1000,
                    (tc - tq) * 1000, (tr - tc) * 1000, (te - t0) * 1000, status, out, term, ac,
                    fc, bc, sc, rc, q, method, url, version))

    assert percent() == fstring() == prefix(), (percent(), fstring(), prefix())
    for name, fn in (("%-format", percent), ("f-string", fstring),
                     ("%-format, cached frontend backend/server", prefix)):
        print(f"line alone, {name:40s} {per_call(fn, n):6.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200000)
    args = parser.parse_args()
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    print(f"python {sys.version.split()[0]}, {'uvloop' if uvloop else 'asyncio'}, "
          f"n={args.n}, best of runs, us per record")
    bench_alternatives(args.n)
    print(f"before (f-string + logging, stderr handler):  {bench_before(loop, args.n // 4):6.2f}")

    null_fd = os.open(os.devnull, os.O_WRONLY)
    stderr_sink = StreamSink(null_fd, "stderr", "worker[gen 1]")
    print(f"request path (_log_line -> AccessLog.http):   "
          f"{bench_request_path(loop, stderr_sink, args.n):6.2f}")
    for batch in (1, 10, 50):
        print(f"total, stderr sink, batch of {batch:3d}:            "
              f"{bench_total(loop, stderr_sink, args.n, batch):6.2f}")

    for per_iteration in (1, 10):
        off = bench_harness(loop, stderr_sink, False, args.n // 2, per_iteration)
        on = bench_harness(loop, stderr_sink, True, args.n // 2, per_iteration)
        print(f"harness, keep-alive request, {per_iteration:2d} per iteration: access log off "
              f"{off:5.2f}, on (stderr sink) {on:5.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "journal.sock")
        reader = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        reader.bind(path)
        reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        stop = threading.Event()

        def drain() -> None:
            reader.settimeout(0.2)
            while not stop.is_set():
                try:
                    reader.recv(65536)
                except OSError:
                    pass
        thread = threading.Thread(target=drain, daemon=True)
        thread.start()
        journal = JournalSink(path, worker_fields(1))
        # A reader thread in this process competes for the GIL: the figure
        # includes some of that; a journald on another core would not.
        journal.send = _counting(journal.send)  # type: ignore[method-assign]
        for batch in (1, 10, 50):
            print(f"total, journal sink, batch of {batch:3d}:           "
                  f"{bench_total(loop, journal, args.n // 4, batch):6.2f}  "
                  f"(dropped {_counting.dropped})")
        stop.set()
        thread.join()
        reader.close()


def _counting(send):
    # The journal reader may fall behind (10 datagrams queue by default):
    # count drops instead of failing the run's assert.
    def wrapped(datagrams):
        lost, error = send(datagrams)
        _counting.dropped += lost
        return 0, None
    return wrapped


_counting.dropped = 0

if __name__ == "__main__":
    main()
