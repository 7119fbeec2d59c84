#!/usr/bin/env python3
"""Where the memory of an idle keep-alive client connection goes (issue 9: <= 2 KiB each).

    .venv/bin/python bench/conn_cost.py                  # every layer, 3000 connections each
    .venv/bin/python bench/conn_cost.py -m bare -m hapy  # some of them
    .venv/bin/python bench/conn_cost.py --tracemalloc    # and the Python allocations by line

Each mode is a fresh server process (uvloop, as a worker runs) that N
clients connect to; each sends one ``GET /small`` request, reads the answer
and stays open, idle (bench.py idle_conn_memory(): the throughput bench's
"per idle connection" row). The figure is the server's RSS growth 2 s later,
divided by N. The modes stack one layer each:

    bare      a trivial Protocol (its transport in a slot) answering a canned 200
    peer      and what HttpClient keeps of the peer: (ip, port) and the ip as bytes
    parser    and an httptools.HttpRequestParser fed the request, kept
    dropped   the same parser, dropped 1 s later (HttpClient's PARSER_IDLE)
    hapy      the real thing: a hapymaster Worker in this process (--src or the
              working tree's code, compiled modules included) proxying to nginx
    hapy-shared  the same, its request parsers replaced by one for the worker
              (share_parser(): a simulation, the code under test is unchanged)
    hapy-perhead  the same, each head parsed by a parser made for it and dropped
              at once (parser_per_head(), a simulation too)

``--tracemalloc`` runs each mode again under tracemalloc (which grows the RSS,
so in a run of its own) and prints the Python allocations still held per
connection at the end, by source line, and in mode hapy the sizes of one
connection's objects (sys.getsizeof).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("bare", "peer", "parser", "dropped", "hapy", "hapy-shared", "hapy-perhead")
PORT = 18090           # the server under test (not the bench's ports)
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Length: 92\r\nContent-Type: text/plain\r\n\r\n"
            + b"x" * 91 + b"\n")


# ------------------------------------------------------------------ the server side

def serve(mode: str, trace: bool) -> None:
    """The server process: serve on PORT, then answer the parent's lines on stdin."""
    import asyncio

    import uvloop
    if trace:
        import tracemalloc
        tracemalloc.start(8)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    keep: set = set()
    worker = None
    if mode == "hapy":
        worker = start_worker(loop)
    elif mode == "hapy-shared":
        share_parser()
        worker = start_worker(loop)
    elif mode == "hapy-perhead":
        parser_per_head()
        worker = start_worker(loop)
    else:
        import httptools

        class Bare(asyncio.Protocol):
            __slots__ = ("transport", "peer", "key", "parser", "t_io")

            def connection_made(self, transport):
                self.transport = transport
                self.parser = None
                if mode != "bare":
                    peer = transport.get_extra_info("peername")
                    self.peer = (peer[0], peer[1])
                    self.key = peer[0].encode()
                if mode in ("parser", "dropped"):
                    self.parser = httptools.HttpRequestParser(self)
                keep.add(self)

            def data_received(self, data):
                if self.parser is not None:
                    self.parser.feed_data(data)
                self.t_io = loop.time()
                self.transport.write(RESPONSE)

            def connection_lost(self, exc):
                keep.discard(self)

        def sweep():
            now = loop.time()
            for conn in keep:
                if conn.parser is not None and now - conn.t_io >= 1.0:
                    conn.parser = None
            loop.call_later(0.25, sweep)
        if mode == "dropped":
            loop.call_later(0.25, sweep)
        loop.run_until_complete(loop.create_server(Bare, "127.0.0.1", PORT, backlog=4096))

    snapshot = None

    def command(line: str) -> None:
        nonlocal snapshot
        if line == "mark" and trace:
            snapshot = tracemalloc.take_snapshot()
        elif line == "report":
            report = {}
            if trace and snapshot is not None:
                diff = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")
                report["lines"] = [(d.size_diff, d.count_diff, str(d.traceback[0]))
                                   for d in diff[:25]]
                report["traced"] = sum(d.size_diff for d in diff)
            if worker is not None:
                report["sizes"] = object_sizes(worker)
            print(json.dumps(report), flush=True)

    reader = sys.stdin.buffer
    loop.add_reader(reader.fileno(), lambda: command(reader.readline().decode().strip()))
    print("ready", flush=True)
    loop.run_forever()


def start_worker(loop):
    """A hapymaster Worker serving one HTTP frontend on PORT, with nginx (NGINX_PORT) behind."""
    from hapymaster.config import parse_config
    from hapymaster.worker.process import Worker
    from hapymaster.worker.proxy_http import http_client_factory
    from hapymaster.worker.proxy_tcp import tcp_client_factory
    config = parse_config(f"""\
global:
  workers: 1
defaults:
  mode: http
  timeout: {{connect: 5s, client: 30s, server: 30s, queue: 5s, tunnel: 1h, http_request: 10s}}
  maxconn: 20000
  access_log: false
frontends:
  - name: fe_http
    bind: ["127.0.0.1:{PORT}"]
    default_backend: origin
backends:
  - name: origin
    balance: roundrobin
    servers:
      - {{name: nginx, address: "127.0.0.1:{int(os.environ['NGINX_PORT'])}"}}
""", "conn_cost.yaml")
    worker = Worker(config, loop)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", PORT))
    sock.listen(4096)
    loop.run_until_complete(worker.open_listeners(
        [{"address": f"127.0.0.1:{PORT}", "fd": sock.detach()}],
        {"http": http_client_factory, "tcp": tcp_client_factory}))
    worker.start_sweeper()
    return worker


def share_parser() -> None:
    """What a worker-wide request parser would save: HttpClient feeds its parser
    whole heads only (it finds their end itself), so one parser can parse
    every connection's heads in turn, its callbacks forwarded to the client
    being fed. Each client keeps a 48-byte handle here, where a real change
    would keep nothing. The shared parser is replaced whenever a feed did not
    end a keep-alive message (a body follows, an error, an upgrade, a close)."""
    import httptools
    real = httptools.HttpRequestParser

    class Sink:
        __slots__ = ("client", "complete", "keep_alive")

        def on_message_begin(self):
            self.client.on_message_begin()

        def on_url(self, url):
            self.client.on_url(url)

        def on_header(self, name, value):
            self.client.on_header(name, value)

        def on_headers_complete(self):
            self.client.on_headers_complete()

        def on_body(self, body):
            self.client.on_body(body)

        def on_message_complete(self):
            # Asked now: once the message is done, llhttp answers for the next one.
            self.complete, self.keep_alive = True, shared[0].should_keep_alive()
            self.client.on_message_complete()

    sink = Sink()
    shared = [real(sink)]

    class Handle:
        __slots__ = ("client",)

        def __init__(self, client):
            self.client = client

        def feed_data(self, data):
            sink.client, sink.complete, sink.keep_alive = self.client, False, False
            parser = shared[0]
            try:
                parser.feed_data(data)
            finally:
                if not sink.complete or not sink.keep_alive:
                    shared[0] = real(sink)
                sink.client = None

        def get_http_version(self):
            return shared[0].get_http_version()

        def should_keep_alive(self):
            return shared[0].should_keep_alive()

        def should_upgrade(self):
            return shared[0].should_upgrade()

        def get_method(self):
            return shared[0].get_method()

    httptools.HttpRequestParser = Handle


def parser_per_head() -> None:
    """What parsing each head with a parser of its own, dropped once it is
    parsed, would save: no parser outlives a read, so none is left in memory
    between requests, and each one's blocks are reused by the next. The
    client keeps a 48-byte handle here (a real change: nothing)."""
    import httptools
    real = httptools.HttpRequestParser

    class Handle:
        __slots__ = ("client", "parser")

        def __init__(self, client):
            self.client = client
            self.parser = None

        def feed_data(self, data):
            self.parser = real(self.client)
            try:
                self.parser.feed_data(data)
            finally:
                self.parser = None

        def get_http_version(self):
            return self.parser.get_http_version()

        def should_keep_alive(self):
            return self.parser.should_keep_alive()

        def should_upgrade(self):
            return self.parser.should_upgrade()

    httptools.HttpRequestParser = Handle


def object_sizes(worker) -> dict[str, int]:
    """sys.getsizeof of one idle client connection's objects (the last one accepted)."""
    client, other = sorted(worker.sessions, key=lambda s: s.t_accept)[-2:][::-1]
    sizes = {"HttpClient": sys.getsizeof(client),
             "transport (uvloop TCPTransport object)": sys.getsizeof(client.transport)}
    for name in ("parser", "reqs", "peer", "client_key", "forwarding", "good_host", "method",
                 "head_buf", "out", "trusted_ip", "connect_task", "srv", "req", "chunks",
                 "parsed"):
        value = getattr(client, name)
        if value is None or (isinstance(value, bytes) and not value):
            continue
        if getattr(other, name) is value and name != "reqs":
            sizes[f"{name} (shared with other connections)"] = 0
            continue
        size = sys.getsizeof(value)
        if name == "peer":
            size += sys.getsizeof(value[0]) + sys.getsizeof(value[1])
        elif name == "reqs":
            size = sys.getsizeof(value)     # an empty list, its item array freed or not
        sizes[name] = size
    sizes["worker.sessions (set) / connection"] = sys.getsizeof(worker.sessions) // len(
        worker.sessions)
    return sizes


# ------------------------------------------------------------------ the measuring side

def run_mode(mode: str, conns: int, trace: bool, env: dict[str, str]) -> tuple[float, dict]:
    """One fresh server: its RSS growth per connection (bytes) and its report."""
    from bench import idle_conn_memory
    server = subprocess.Popen([sys.executable, __file__, "--serve", mode,
                               *(["--tracemalloc"] if trace else [])],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        line = server.stdout.readline()
        if line.strip() != b"ready":
            raise SystemExit(f"conn_cost: the {mode} server did not start ({line!r})")
        if mode == "hapy":
            # One request first: the pooled server connection and first-use state.
            with socket.create_connection(("127.0.0.1", PORT)) as warm:
                warm.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                while warm.recv(65536):
                    pass
        time.sleep(0.3)
        server.stdin.write(b"mark\n")
        server.stdin.flush()
        time.sleep(0.2)
        report: dict = {}

        def before_close(pid: int) -> int:
            # idle_conn_memory reads the RSS after its 2 s: ask for the report then too.
            rss = proc_rss(pid)
            if measured:
                server.stdin.write(b"report\n")
                server.stdin.flush()
                report.update(json.loads(server.stdout.readline()))
            measured.append(rss)
            return rss
        measured: list[int] = []
        import bench
        bench.proc_rss_kib = before_close
        before, after = idle_conn_memory(PORT, server.pid, conns)
        return (after - before) * 1024 / conns, report
    finally:
        server.kill()
        server.wait()


def proc_rss(pid: int) -> int:
    from common import proc_rss_kib
    return proc_rss_kib(pid)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--mode", action="append", choices=MODES,
                    help="a layer to measure (repeatable; all by default)")
    ap.add_argument("-c", "--conns", type=int, default=3000, help="connections per mode (3000)")
    ap.add_argument("-n", "--runs", type=int, default=1, help="fresh servers per mode (1)")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="also a run under tracemalloc: Python allocations by line")
    ap.add_argument("--src", type=Path, metavar="DIR",
                    help="mode hapy runs DIR/hapymaster, not the working tree's")
    ap.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve, args.tracemalloc)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import NGINX_PORT, REPO, VENV_PY, start, stop_all, wait_port
    from configs import write_origin
    from bench import port_answers
    modes = args.mode or list(MODES)
    busy = [port for port in (NGINX_PORT, PORT) if port_answers(port)]
    if busy:
        raise SystemExit(f"conn_cost: something already listens on 127.0.0.1 port(s) {busy}; "
                         "wait for it to finish")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.conns + 1000)), hard))
    wd = Path(tempfile.mkdtemp(prefix="hapy-cost-"))
    atexit.register(lambda: shutil.rmtree(wd, ignore_errors=True))
    atexit.register(stop_all)
    env = dict(os.environ, NGINX_PORT=str(NGINX_PORT))
    env.pop("PYTHONDONTWRITEBYTECODE", None)    # byte-compiled, as the package runs
    env["PYTHONPATH"] = str(args.src.resolve() if args.src else REPO)
    if "hapy" in modes:
        package = Path(env["PYTHONPATH"]) / "hapymaster"
        subprocess.run([str(VENV_PY), "-m", "compileall", "-q", str(package)], env=env,
                       check=True)
        nginx = start(["nginx", "-c", str(write_origin(wd)), "-p", str(wd)], wd / "nginx.log",
                      None)
        wait_port(NGINX_PORT, nginx, "nginx")
    os.chdir(wd)
    print(f"# {args.conns} idle keep-alive connections per server; RSS growth per connection")
    for mode in modes:
        figures = sorted(run_mode(mode, args.conns, False, env)[0] for _ in range(args.runs))
        print(f"{mode:8s} {figures[len(figures) // 2]:7.0f} B"
              + (f"  (min {figures[0]:.0f}, max {figures[-1]:.0f})" if len(figures) > 1 else ""),
              flush=True)
    if args.tracemalloc:
        for mode in modes:
            _, report = run_mode(mode, args.conns, True, env)
            print(f"\n# {mode}: tracemalloc, still held per connection: "
                  f"{report.get('traced', 0) / args.conns:.0f} B")
            for size, count, where in report.get("lines", []):
                if abs(size) >= args.conns * 8:
                    print(f"{size / args.conns:7.0f} B {count / args.conns:6.2f} blocks  {where}")
            for name, size in report.get("sizes", {}).items():
                print(f"  sizeof {name}: {size} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
