"""Faults the proxy must survive: fd exhaustion, servers that die or talk garbage.

Every test is bounded (a few hundred connections at most, seconds) and talks
only to loopback servers it started.
"""

from __future__ import annotations

import os
import re
import resource
import socket
import time

from worker_harness import RawServer, http_config, http_get, raw_exchange


class ScriptedServer(RawServer):
    """A raw TCP 'server' that reads a request head and answers ``reply`` verbatim.

    ``then_die``: after answering, close the connection and the listener too,
    as a crashed process would. Counts connections, to see reuse.
    """

    def __init__(self, reply: bytes, then_die: bool = False):
        self.reply = reply
        self.then_die = then_die
        self.requests = 0
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while True:
                    while b"\r\n\r\n" not in data:
                        chunk = conn.recv(65536)
                        if not chunk:
                            return
                        data += chunk
                    head, _, data = data.partition(b"\r\n\r\n")
                    if head.startswith(b"GET /health"):
                        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                        continue
                    self.requests += 1
                    conn.sendall(self.reply)
                    if self.then_die:
                        self.stop()
                        return
            except OSError:
                return



def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _hold(address: str, count: int) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    held = []
    for _ in range(count):
        held.append(socket.create_connection((host, int(port)), timeout=5))
    return held


def test_a_server_dying_mid_response_truncates_that_response_only(backend, bind, run_worker):
    dying = ScriptedServer(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"A" * 1000,
                           then_die=True)
    healthy = backend("b")
    front = bind("web")
    worker = run_worker(http_config(
        front, [("a", dying.address), ("b", healthy.address)], balance="first",
        extra_backend="    check: {interval: 100ms, rise: 1, fall: 1}").replace(
            'address: "%s"}' % dying.address, 'address: "%s", check: true}' % dying.address))
    answer = raw_exchange(front, b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n", timeout=10)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    # Exactly what the server sent, then the close: a truncated body the client
    # can detect (Content-Length not reached), never bytes of another answer.
    assert body == b"A" * 1000
    assert answer.count(b"HTTP/1.1") == 1
    # Its checks take the dead server out; everyone else is served by b.
    deadline = time.monotonic() + 10
    while "Server app/a is DOWN" not in worker.log:
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.05)
    for _ in range(5):
        status, headers, _ = http_get(front)
        assert status == 200 and headers["X-Origin"] == "b"
    assert worker.proc.poll() is None


def test_a_server_answering_garbage_gets_502_and_is_not_reused(bind, run_worker):
    garbage = ScriptedServer(b"this is not HTTP\r\n\r\n")
    front = bind("web")
    worker = run_worker(http_config(front, [("g", garbage.address)]))
    for attempt in (1, 2):
        status, _, _ = http_get(front)
        assert status == 502
        # Each request on a connection of its own: one that spoke garbage is closed.
        assert garbage.connections == attempt
    deadline = time.monotonic() + 5
    while worker.log.count(" 502 ") < 2:
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.05)
    assert worker.proc.poll() is None
    garbage.stop()


def _wait_log(worker, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in worker.log:
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{worker.log[-3000:]}"
        time.sleep(0.05)


def _closed(sock: socket.socket) -> bool:
    """Did the proxy close (or reset) this client connection?"""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.setblocking(True)


def _get(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "closed without an answer"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head


NOFILE = 400


def test_the_maxconn_derived_from_the_fd_limit_is_logged_once_not_at_every_reload(backend,
                                                                                 bind, run_worker):
    origin = backend("a")
    first = run_worker(http_config(bind("web"), [("a", origin.address)]), nofile=NOFILE)
    _wait_log(first, f"the file descriptor limit ({NOFILE}")
    derived = int(re.search(r"Maxconn: (\d+)", first.cli("show info")).group(1))
    assert 0 < derived < NOFILE // 2
    # A worker of a later generation applies the limit too (its budget also
    # counts the descriptors open at its start), silently.
    later = run_worker(http_config(bind("web2"), [("a", origin.address)]), nofile=NOFILE,
                       generation=2)
    _wait_log(later, "ready:")
    capped = int(re.search(r"Maxconn: (\d+)", later.cli("show info")).group(1))
    assert abs(capped - derived) <= 4, (capped, derived)
    assert "file descriptor limit" not in later.log, later.log


def test_a_low_fd_limit_makes_clients_wait_instead_of_being_dropped(backend, bind, run_worker):
    """ulimit -n caps maxconn (2 descriptors per client): beyond it clients wait, none is closed.

    Without the cap, libuv meets EMFILE on accept and closes every client in
    the backlog (its "emfile trick"), silently.
    """
    origin = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", origin.address)]), nofile=NOFILE)
    _wait_log(worker, f"the file descriptor limit ({NOFILE}")
    maxconn = int(re.search(r"allows (\d+) connections", worker.log).group(1))
    assert 0 < maxconn < NOFILE // 2
    host, port = front.rsplit(":", 1)
    held = [socket.create_connection((host, int(port)), timeout=10) for _ in range(maxconn)]
    for sock in held:          # every admitted client has its server connection too
        assert _get(sock).startswith(b"HTTP/1.1 200")
    waiting = [socket.create_connection((host, int(port)), timeout=10) for _ in range(40)]
    time.sleep(0.5)
    assert not any(_closed(s) for s in waiting), "clients beyond the limit were dropped"
    _wait_log(worker, f"worker reached maxconn {maxconn}")
    for sock in held[:40]:     # the held ones are still served...
        assert _get(sock).startswith(b"HTTP/1.1 200")
    for sock in held[:40]:     # ...and when 40 leave, the 40 waiting ones get in
        sock.close()
    for sock in waiting:
        assert _get(sock).startswith(b"HTTP/1.1 200")
    assert worker.log.count("worker reached maxconn") == 1, "logged once, not per accept"
    for sock in held[40:] + waiting:
        sock.close()
    assert worker.proc.poll() is None


def test_fd_exhaustion_on_connect_gets_503_logged_once_and_recovers(backend, bind, run_worker):
    import http.client
    origin = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", origin.address)]))
    pid = worker.proc.pid
    host, port = front.rsplit(":", 1)
    first = http.client.HTTPConnection(host, int(port), timeout=10)
    # Connected beforehand: under EMFILE no new client can be accepted either.
    others = [http.client.HTTPConnection(host, int(port), timeout=10)]
    first.request("GET", "/")                     # one pooled server connection, no more
    first.getresponse().read()
    for conn in others:
        conn.connect()
    time.sleep(0.3)                                # accepted by the worker
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    # Not one descriptor to spare, as after a leak or an external prlimit.
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (_fd_count(pid), hard))
    try:
        first.request("GET", "/delay/1")          # holds the pooled server connection
        time.sleep(0.2)
        for conn in others:                       # needs a new one: no fd for it
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            assert response.status == 503
        response = first.getresponse()            # the busy one finishes normally
        assert response.status == 200 and response.read()
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
    _wait_log(worker, "out of file descriptors")
    # One line, although the request tried four connects (retries 3).
    assert worker.log.count("out of file descriptors") == 1, worker.log
    status, _, _ = http_get(front)                # and it recovers
    assert status == 200
    assert worker.proc.poll() is None
