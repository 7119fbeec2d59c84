"""Soft stop (SIGUSR1) loses no request: in-flight responses go out with
Connection: close, idle keep-alive connections get ``global.soft_stop_grace``
for a last request, idle pooled server connections are closed at once."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest

from hapymaster.config import ConfigError, parse_config
from worker_harness import RawServer, http_config
from test_http import connect, read_response


def warm(front: str) -> tuple[socket.socket, object]:
    """A keep-alive client connection that has been served once and is now idle."""
    sock = connect(front, timeout=10)
    sock_file = sock.makefile("rb")
    sock.sendall(b"GET /warm HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = read_response(sock_file)
    assert status == 200 and headers.get("connection") != "close"
    return sock, sock_file


def test_request_right_after_soft_stop_gets_an_answer_with_close(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global="  soft_stop_grace: 3s"))
    now_sock, now_file = warm(front)
    later_sock, later_file = warm(front)
    worker.proc.send_signal(signal.SIGUSR1)
    # One client sends at the very instant of the stop, one a little later:
    # neither may see its idle connection closed under it.
    now_sock.sendall(b"GET /now HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    later_sock.sendall(b"GET /later HTTP/1.1\r\nHost: x\r\n\r\n")
    for sock, sock_file in ((now_sock, now_file), (later_sock, later_file)):
        status, headers, body = read_response(sock_file)
        assert status == 200 and headers["connection"] == "close"
        assert sock_file.read() == b""     # then closed, cleanly
        sock.close()
    paths = [path for _, path, _ in a.requests]
    assert "/now" in paths and "/later" in paths
    # Both connections are gone: the worker leaves without waiting for the grace.
    assert worker.wait_exit(2.5) == 0


def test_idle_connection_closed_after_the_grace_not_before(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    grace = 1.0
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global=f"  soft_stop_grace: {int(grace * 1000)}ms"))
    sock, sock_file = warm(front)
    sent = time.monotonic()
    worker.proc.send_signal(signal.SIGUSR1)
    assert sock.recv(1) == b""        # EOF, no answer: it asked for nothing
    waited = time.monotonic() - sent
    assert waited >= grace
    assert waited < grace + 8         # generous: a loaded machine
    assert worker.wait_exit(5) == 0
    sock.close()


def test_in_flight_request_finishes_with_close_while_idle_ones_wait(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global="  soft_stop_grace: 2s"))
    idle_sock, idle_file = warm(front)
    busy = connect(front, timeout=10)
    busy_file = busy.makefile("rb")
    busy.sendall(b"GET /delay/0.8 HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    worker.proc.send_signal(signal.SIGUSR1)
    status, headers, body = read_response(busy_file)
    assert status == 200 and headers["connection"] == "close" and b"/delay/0.8" in body
    assert busy_file.read() == b""
    # The idle connection still takes a request after the slow one ended.
    idle_sock.sendall(b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = read_response(idle_file)
    assert status == 200 and headers["connection"] == "close"
    assert worker.wait_exit(5) == 0
    busy.close()
    idle_sock.close()


class KeepAliveOrigin(RawServer):
    """An HTTP origin that keeps its connections and notes when one is closed by the proxy."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            buffer = b""
            while True:
                data = conn.recv(65536)
                if not data:
                    self.closed.set()
                    return
                buffer += data
                while b"\r\n\r\n" in buffer:
                    _, buffer = buffer.split(b"\r\n\r\n", 1)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")


def test_idle_pooled_server_connections_closed_at_soft_stop(bind, run_worker):
    origin = KeepAliveOrigin()
    front = bind("web")
    try:
        worker = run_worker(http_config(front, [("a", origin.address)],
                                        extra_global="  soft_stop_grace: 20s"))
        # The client connection stays idle: the worker lives on through the
        # grace, so the server connection is closed by the stop, not by the exit.
        sock, sock_file = warm(front)
        assert origin.connections == 1 and not origin.closed.is_set()
        worker.proc.send_signal(signal.SIGUSR1)
        assert origin.closed.wait(8)
        assert worker.proc.poll() is None
        sock_file.close()
        sock.close()
        assert worker.wait_exit(5) == 0
    finally:
        origin.stop()


def test_soft_stop_grace_config_key():
    text = http_config("127.0.0.1:1", [("a", "127.0.0.1:2")], extra_global="  soft_stop_grace: 1500ms")
    assert parse_config(text, "t.yaml").global_.soft_stop_grace == 1.5
    assert parse_config(http_config("127.0.0.1:1", [("a", "127.0.0.1:2")]),
                        "t.yaml").global_.soft_stop_grace == 1.0
    bad = http_config("127.0.0.1:1", [("a", "127.0.0.1:2")], extra_global="  soft_stop_grace: soon")
    with pytest.raises(ConfigError) as caught:
        parse_config(bad, "t.yaml")
    assert caught.value.errors[0].startswith("t.yaml:3: ")
    assert "soft_stop_grace" in caught.value.errors[0]


def test_tcp_session_runs_to_its_end_through_a_soft_stop(tcp_backend, bind, run_worker):
    a = tcp_backend("alpha")
    front = bind("tcp")
    config = http_config(front, [("a", a.address)],
                         extra_global="  soft_stop_grace: 100ms").replace("mode: http", "mode: tcp")
    worker = run_worker(config)
    with connect(front, timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline() == b"hello from alpha\n"
        worker.proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)                   # well past the grace: TCP has no idle notion
        sock.sendall(b"still here\n")
        assert f.readline() == b"still here\n"
        assert worker.proc.poll() is None
        sock.shutdown(socket.SHUT_WR)
        assert f.read() == b""
        f.close()
    assert worker.wait_exit(5) == 0
