"""TCP mode with bulk data, real sockets through a real worker: data intact
both ways with a half-close, backpressure on a slow reader, a server that
resets mid-transfer, the inactivity timeout after a transfer, the byte
counters, a soft stop during a transfer.

(Written for a splice(2) relay that was measured and not kept: no less CPU
per byte than the transports on this machine, see README "Benchmarks".)"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import struct
import threading
import time

from worker_harness import RawServer, http_config, pattern_bytes

MIB = 1 << 20


def tcp_config(front: str, server: str, extra_defaults: str = "") -> str:
    return http_config(front, [("a", server)], extra_defaults=extra_defaults).replace(
        "mode: http", "mode: tcp")


def connect(front: str, timeout: float = 10.0) -> socket.socket:
    host, port = front.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(1 << 20, size - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def stat_row(worker, backend: str, server: str) -> dict[str, str]:
    lines = [line for line in worker.cli("show stat").splitlines() if line]
    header = lines[0][2:].split(",")
    for row in (line.split(",") for line in lines[1:]):
        if row[0] == backend and row[1] == server:
            return dict(zip(header, row))
    raise AssertionError(f"no row {backend}/{server}")


class Sender(RawServer):
    """Sends ``size`` pattern bytes, then either ends its side (FIN) or resets.

    It counts what it managed to send (``sent``) and can wait for a go.
    """

    def __init__(self, size: int, reset_after: int = -1) -> None:
        self.size = size
        self.reset_after = reset_after
        self.sent = 0
        self.done = threading.Event()
        super().__init__()

    def answer(self, conn: socket.socket) -> None:
        data = pattern_bytes(self.size)
        view = memoryview(data)
        limit = self.size if self.reset_after < 0 else self.reset_after
        try:
            while self.sent < limit:
                self.sent += conn.send(view[self.sent:min(limit, self.sent + 256 * 1024)])
            if self.reset_after >= 0:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)             # the client's end (EOF) before closing
        except OSError:
            pass
        finally:
            conn.close()
            self.done.set()


class Echo(RawServer):
    """Echoes everything; ends its side once the client ended its own (half-close)."""

    def answer(self, conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)


def test_large_echo_both_ways_intact_then_half_close(bind, run_worker):
    echo = Echo()
    front = bind("tcp")
    worker = run_worker(tcp_config(front, echo.address))
    payload = os.urandom(24 * MIB)
    with connect(front) as sock:
        def send() -> None:
            view = memoryview(payload)
            for i in range(0, len(payload), 256 * 1024):
                sock.sendall(view[i:i + 256 * 1024])
            sock.shutdown(socket.SHUT_WR)   # half-close: the echo still comes back, then EOF
        sender = threading.Thread(target=send)
        sender.start()
        got = recv_exactly(sock, len(payload))
        assert sock.recv(1) == b""          # the echo's end of stream was passed on
        sender.join(10)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(payload).hexdigest()
    # Both directions counted, once the session is over.
    assert wait_for(lambda: int(stat_row(worker, "app", "a")["stot"]) == 1)
    row = stat_row(worker, "app", "a")
    assert int(row["bin"]) == len(payload) and int(row["bout"]) == len(payload), row
    echo.stop()


def test_slow_reader_holds_the_server_back(bind, run_worker):
    size = 96 * MIB
    sender = Sender(size)
    front = bind("tcp")
    run_worker(tcp_config(front, sender.address))
    with connect(front, timeout=30) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        first = recv_exactly(sock, 2 * MIB)
        # The client stops reading: the server must stall once the buffers
        # on the way (the kernel's, the worker's write limit) are full, not
        # push everything into the worker.
        previous = -1
        while sender.sent != previous:            # until it no longer moves
            previous = sender.sent
            time.sleep(0.3)
        assert sender.sent < 48 * MIB, sender.sent
        rest = recv_exactly(sock, size - len(first))
        assert sock.recv(1) == b""
    assert hashlib.sha256(first + rest).digest() == hashlib.sha256(pattern_bytes(size)).digest()
    assert sender.done.wait(10)
    sender.stop()


def test_server_reset_mid_transfer_ends_the_session(bind, run_worker):
    sender = Sender(64 * MIB, reset_after=4 * MIB)
    front = bind("tcp")
    worker = run_worker(tcp_config(front, sender.address))
    with connect(front) as sock:
        got = 0
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
        except ConnectionResetError:
            pass                                   # cut, as the server cut
    assert 0 < got <= 4 * MIB
    assert sender.done.wait(10)
    assert wait_for(lambda: int(stat_row(worker, "app", "a")["stot"]) == 1)
    assert worker.proc.poll() is None
    row = stat_row(worker, "app", "a")
    assert int(row["bout"]) >= got and int(row["stot"]) == 1, row
    sender.stop()


def test_idle_timeout_after_a_transfer(bind, run_worker):
    class Quiet(RawServer):
        """Sends 1 MiB, then nothing, and keeps the connection open."""

        def answer(self, conn: socket.socket) -> None:
            with conn:
                conn.sendall(pattern_bytes(MIB))
                conn.recv(1)

    quiet = Quiet()
    front = bind("tcp")
    run_worker(tcp_config(front, quiet.address, extra_defaults="  timeout: {client: 300ms}"))
    with connect(front) as sock:
        assert recv_exactly(sock, MIB) == pattern_bytes(MIB)
        started = time.monotonic()
        assert sock.recv(1) == b""               # closed by the worker's inactivity limit
        assert 0.25 < time.monotonic() - started < 5.0
    quiet.stop()


def test_a_transfer_runs_to_its_end_through_a_soft_stop(bind, run_worker):
    sender = Sender(32 * MIB)
    front = bind("tcp")
    worker = run_worker(tcp_config(front, sender.address))
    with connect(front, timeout=30) as sock:
        first = recv_exactly(sock, 2 * MIB)
        worker.proc.send_signal(signal.SIGUSR1)              # soft stop: listeners close
        rest = recv_exactly(sock, 30 * MIB)
        assert sock.recv(1) == b""                           # the server's end, passed on
    assert first + rest == pattern_bytes(32 * MIB)
    assert worker.wait_exit(10) == 0                         # gone once the session ended
    sender.stop()
