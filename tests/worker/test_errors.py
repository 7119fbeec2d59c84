"""Hostile requests, error answers and every timeout."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from worker_harness import free_listener, http_config, http_get, raw_exchange
from test_http import connect, read_response


@pytest.fixture
def proxy(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_frontend="    max_body_size: 1000"))
    return front, a, worker


SMUGGLING = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
    "two_lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 40\r\n\r\nabc",
    "bad_chunk_size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "te_not_chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    # Taken as chunked by llhttp (its last word), yet not a transfer coding:
    # it was forwarded, then the body failed (found by the request-path fuzzer).
    "te_not_a_coding": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: x: chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n",
    "http09": b"GET /\r\n\r\n",
    "space_before_colon": b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
    "negative_length": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_hostile_request_gets_400_and_nothing_reaches_the_server(proxy, name):
    front, origin, worker = proxy
    answer = raw_exchange(front, SMUGGLING[name])
    assert answer.startswith(b"HTTP/1.1 400 Bad request\r\n"), answer[:100]
    assert answer.count(b"HTTP/1.1") == 1
    assert b"Your browser sent an invalid request." in answer
    assert origin.requests == []
    assert worker.proc.poll() is None


def test_header_section_too_large_431(proxy):
    front, origin, _ = proxy
    headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"v" * 200) for i in range(100))
    answer = raw_exchange(front, b"GET / HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.startswith(b"HTTP/1.1 431 ")
    assert origin.requests == []


def test_request_line_too_long_414(proxy):
    front, _, _ = proxy
    answer = raw_exchange(front, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 414 ")


def test_body_too_large_413(proxy):
    front, origin, _ = proxy
    status, _, _ = http_get(front, "/", method="POST", body=b"x" * 2000)
    assert status == 413
    answer = raw_exchange(front, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                                 + b"200\r\n" + b"y" * 512 + b"\r\n" + b"400\r\n" + b"z" * 1024
                                 + b"\r\n0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert http_get(front, "/", method="POST", body=b"x" * 100)[0] == 200


def test_bad_response_from_server_502(bind, run_worker):
    listener = free_listener()
    port = listener.getsockname()[1]

    def serve():
        for reply in (b"NOT HTTP AT ALL\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Le"):
            conn, _ = listener.accept()
            conn.recv(65536)
            conn.sendall(reply)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    front = bind("web")
    worker = run_worker(http_config(front, [("bad", f"127.0.0.1:{port}")]))
    for _ in range(2):
        status, _, body = http_get(front)
        assert status == 502 and b"invalid or incomplete response" in body
    assert worker.proc.poll() is None
    listener.close()


def test_server_timeout_504(backend, bind, run_worker):
    slow = backend("slow", delay=1.5)
    front = bind("web")
    run_worker(http_config(front, [("slow", slow.address)], extra_defaults="  timeout: {server: 300ms}"))
    started = time.monotonic()
    status, _, body = http_get(front)
    assert status == 504 and b"didn't respond in time" in body
    assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout


def test_slowloris_http_request_timeout_408(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)], extra_defaults="  timeout: {http_request: 300ms}"))
    with connect(front) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        for _ in range(3):
            time.sleep(0.05)
            sock.sendall(b"X-Slow: 1\r\n")  # trickling headers does not extend the deadline
        answer = sock.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout
    assert a.requests == []


def test_keep_alive_idle_timeout_closes(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)], extra_defaults="  timeout: {http_keep_alive: 300ms}"))
    with connect(front) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(f)[0] == 200
        started = time.monotonic()
        assert f.read() == b""  # closed silently
        assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout


def test_client_timeout_during_body_408(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)], extra_defaults="  timeout: {client: 300ms}"))
    with connect(front) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        answer = sock.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout


def test_connect_timeout_503(bind, run_worker):
    # A listener that never accepts, with its backlog full: SYNs go unanswered.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    front = bind("web")
    worker = run_worker(http_config(front, [("hole", f"127.0.0.1:{port}")],
                                    extra_defaults="  timeout: {connect: 100ms}"))
    started = time.monotonic()
    status, _, _ = http_get(front, timeout=10)
    elapsed = time.monotonic() - started
    assert status == 503
    assert 0.3 < elapsed < 3.0  # 1 try + 3 retries of 100 ms
    for s in fillers:
        s.close()
    hole.close()


def test_tunnel_timeout(bind, run_worker):
    listener = free_listener()
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n")
        time.sleep(3)
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    front = bind("web")
    run_worker(http_config(front, [("t", f"127.0.0.1:{port}")],
                           extra_defaults="  timeout: {tunnel: 300ms, server: 5s, client: 5s}"))
    with connect(front) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 101")
        started = time.monotonic()
        while f.readline() not in (b"\r\n", b""):
            pass
        assert f.read() == b""
        assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout
    listener.close()


def test_tcp_idle_timeout(tcp_backend, bind, run_worker):
    a = tcp_backend("a")
    front = bind("tcp")
    config = http_config(front, [("a", a.address)], extra_defaults="  timeout: {client: 300ms}")
    run_worker(config.replace("mode: http", "mode: tcp"))
    with connect(front) as sock:
        f = sock.makefile("rb")
        assert f.readline() == b"hello from a\n"
        started = time.monotonic()
        assert f.read() == b""
        assert 0.25 < time.monotonic() - started < 3.0  # well under any default timeout
