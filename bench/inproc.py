"""Python cost of one small keep-alive request, in process (no sockets, no loop).

Feeds the worker's HTTP client and server Protocols a wrk request and
nginx's answer through fake transports (tests/worker/fake_transport.py),
N times on one client connection and one pooled server connection, and
prints microseconds per request (best of R runs).

    .venv/bin/python bench/inproc.py [N] [R]

On a shared or loaded machine the times wander by 2x; the instructions per
request do not: run ``count`` under callgrind for two values of N and take
the difference (it cancels the start-up):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null \
        .venv/bin/python bench/inproc.py count 1000     # then 3000
    # instructions/request = (Ir(3000) - Ir(1000)) / 2000
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "worker"))

from fake_transport import FakeTransport, connect, inprocess_worker  # noqa: E402

CONFIG = """\
defaults:
  mode: http
  access_log: {log}
frontends:
  - {{name: web, bind: ["127.0.0.1:18080"], default_backend: app}}
backends:
  - name: app
    servers:
      - {{name: s1, address: "127.0.0.1:9"}}
"""

REQUEST = b"GET /small HTTP/1.1\r\nHost: 127.0.0.1:18080\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 02 Dec 2026 14:00:00 GMT\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 13\r\n"
            b"Last-Modified: Wed, 02 Dec 2026 13:00:00 GMT\r\nConnection: keep-alive\r\n"
            b"ETag: \"656e1234-d\"\r\nAccept-Ranges: bytes\r\n\r\nhello world!\n")


def run(n: int, log: bool) -> float:
    from hapymaster.worker.proxy_http import http_client_factory
    from hapymaster.worker.server_conn import HttpServer
    worker = inprocess_worker(CONFIG.format(log="true" if log else "false"))
    fe = worker.frontends[0]
    server = worker.backends["app"].servers[0]
    conn = HttpServer(worker, server)
    connect(conn, FakeTransport(("127.0.0.1", 9), keep=False))
    conn.release(True)     # into the server's pool
    client = http_client_factory(worker, fe)
    out = connect(client, FakeTransport(keep=False))
    feed_client, feed_server = client.data_received, conn.data_received
    start = time.perf_counter()
    for _ in range(n):
        feed_client(REQUEST)
        feed_server(RESPONSE)
    took = time.perf_counter() - start
    assert out.size >= n * 200 and not out.closing, (out.size, out.calls)
    return took / n * 1e6


def quiet_access_log() -> None:
    """The access log's cost without writing it anywhere (the logging call still runs)."""
    import logging
    logging.getLogger("hapymaster.access").addHandler(logging.NullHandler())
    logging.getLogger("hapymaster.access").propagate = False


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "count":
        quiet_access_log()
        run(int(sys.argv[2]), False)
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
    quiet_access_log()
    for log in (False, True):
        best = min(run(n, log) for _ in range(rounds))
        print(f"access_log {'on ' if log else 'off'}: {best:.2f} us/request (best of {rounds} x {n})")


if __name__ == "__main__":
    main()
