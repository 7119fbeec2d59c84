"""The TCP relay: two Protocols that feed and pause each other.

The client's bytes are held (one read at most, reading paused) until the
server connection is up, then everything is passed through as is. Half-close
is relayed (a client that shuts its sending side still gets the server's
answer). The session ends when both directions have ended, or after
``min(timeout.client, timeout.server)`` without data either way.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from hapymaster.worker.balance import NO_SERVER, ServerState
from hapymaster.worker.exchange import CONNECT, PARKED, QUEUE, TUNNEL, WRITE_HIGH

if TYPE_CHECKING:
    from hapymaster.worker.process import FrontendState, Worker


class TcpClient:
    def __init__(self, worker: "Worker", frontend: "FrontendState"):
        self.w = worker
        self.fe = frontend
        self.transport: Any = None
        self.peer: tuple[str, int] = ("", 0)
        self.client_key = b""
        self.backend = frontend.default_backend
        self.server: ServerState | None = None
        self.server_last: ServerState | None = None
        self.srv: TcpServer | None = None
        self.pending: list[bytes] = []
        self.client_eof = False
        self.server_eof = False
        self.closed = False
        self.phase = PARKED
        self.deadline = 0.0
        self.t_io = 0.0
        self.t_start = 0.0
        self.t_queue = -1.0
        self.t_connect = -1.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.retries = 0
        self.term = "--"
        self.connect_task: asyncio.Future | None = None
        self.logged = False
        self.timeout = min(frontend.timeout.client, self.backend.timeout.server)

    def enter(self, phase: int, now: float) -> None:
        """The one place the session changes phase, and arms that phase's timeout."""
        self.phase = phase
        if phase == QUEUE:
            self.deadline = now + self.backend.timeout.queue
        elif phase == CONNECT:
            self.deadline = now + self.backend.timeout.connect
        elif phase == TUNNEL:
            self.t_io = now     # an inactivity limit

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
            self.client_key = peer[0].encode()
        self.t_start = self.t_io = self.w.clock()
        self.t_start_wall = time.time()   # the log line's date (HAProxy's %tr)
        if not self.w.admit(self, self.fe):
            transport.pause_reading()
            return
        self.start()

    def start(self) -> None:
        self.transport.pause_reading()
        server = self.backend.take(self, self.client_key)
        if server is None:
            self.enter(QUEUE, self.w.clock())
        elif server is NO_SERVER:
            self.term = "SC"
            self.abort()
        else:
            self.on_server(server)

    def on_server(self, server: ServerState | None) -> None:
        if self.closed:
            if server is not None:
                server.backend.release(server)
            return
        now = self.t_queue = self.w.clock()
        if server is None:
            self.term = "SQ"
            self.abort()
            return
        self.server = self.server_last = server
        self.enter(CONNECT, now)
        self.connect_task = self.w.open_connection(lambda: TcpServer(self), server.host,
                                                   server.port, self._opened)

    def _opened(self, srv: TcpServer | None, exc: OSError | None) -> None:
        self.connect_task = None
        if srv is None:
            self._connect_failed()
            return
        if self.closed:
            srv.transport.close()
            return
        self.t_connect = self.w.clock()
        self.srv = srv
        self.enter(TUNNEL, self.t_connect)
        if self.pending:
            srv.transport.writelines(self.pending)
            self.pending = []
        if self.client_eof and srv.transport.can_write_eof():
            srv.transport.write_eof()
        else:
            self.transport.resume_reading()

    def _connect_failed(self) -> None:
        server = self.server
        if server is not None:
            server.counters.econ += 1
            self.backend.counters.econ += 1
            self.server = None
            self.backend.release(server)
        if self.retries < 3 and not self.closed:
            self.retries += 1
            if server is not None:
                server.counters.wretr += 1
            self.start()
            return
        self.term = "SC"
        self.abort()

    def data_received(self, data: bytes) -> None:
        self.t_io = self.w.clock()
        self.bytes_in += len(data)
        srv = self.srv
        if srv is not None:
            srv.transport.write(data)
        else:
            self.pending.append(data)
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.client_eof = True
        srv = self.srv
        if srv is not None and not srv.transport.is_closing():
            if srv.transport.can_write_eof():
                srv.transport.write_eof()
        if self.server_eof:
            return False
        return True

    def pause_writing(self) -> None:
        if self.srv is not None:
            self.srv.transport.pause_reading()

    def resume_writing(self) -> None:
        self.t_io = self.w.clock()
        if self.srv is not None:
            self.srv.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def soft_stop(self) -> None:
        pass  # a TCP session ends when its peers end it

    def expire(self, now: float) -> None:
        if self.phase == TUNNEL:
            if now - self.t_io >= self.timeout:
                self.term = "cD"
                self.abort()
        elif self.phase == QUEUE:
            if now >= self.deadline:
                self.term = "sQ"
                self.backend.dequeue(self)
                self.abort()
        elif self.phase == CONNECT:
            if now >= self.deadline and self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
                self._connect_failed()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.phase == QUEUE:
            self.backend.dequeue(self)
        if self.connect_task is not None:
            self.connect_task.cancel()
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.client = None
            srv.transport.close()
        server, self.server = self.server, None
        if server is not None:
            self.backend.release(server)
        self._log()
        self.w.release_conn(self, self.fe)

    def server_lost(self) -> None:
        self.srv = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _log(self) -> None:
        fe = self.fe
        fe.counters.bin += self.bytes_in
        fe.counters.bout += self.bytes_out
        bc = self.backend.counters
        bc.bin += self.bytes_in
        bc.bout += self.bytes_out
        bc.stot += 1
        server = self.server_last
        if server is not None:
            sc = server.counters
            sc.stot += 1
            sc.bin += self.bytes_in
            sc.bout += self.bytes_out
        if not fe.access_log:
            return
        # HAProxy's tcplog, built and written by accesslog once per loop iteration.
        w = self.w
        backend = self.backend
        w.access_log.tcp(
            fe.name, self.peer[0], self.peer[1], backend.name,
            server.name if server is not None else "<NOSRV>", self.t_start_wall, self.t_start,
            self.t_queue, self.t_connect, w.clock(), self.bytes_out, self.term, w.cur_conns,
            fe.cur, backend.cur, server.cur if server is not None else 0, self.retries,
            len(backend.queue))


class TcpServer:
    def __init__(self, client: TcpClient):
        self.client: TcpClient | None = client
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            return
        client.t_io = client.w.clock()
        client.bytes_out += len(data)
        client.transport.write(data)

    def eof_received(self) -> bool:
        client = self.client
        if client is None:
            return False
        client.server_eof = True
        if client.transport.can_write_eof() and not client.transport.is_closing():
            client.transport.write_eof()
        if client.client_eof:
            return False
        return True

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.server_lost()


def tcp_client_factory(worker: "Worker", frontend: "FrontendState") -> TcpClient:
    """The protocol of one client connection on a TCP frontend."""
    return TcpClient(worker, frontend)
