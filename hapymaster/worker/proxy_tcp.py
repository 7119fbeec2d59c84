"""The TCP relay: two Protocols that feed and pause each other.

The client's bytes are held (one read at most, reading paused) until the
server connection is up, then everything is passed through as is. Half-close
is relayed (a client that shuts its sending side still gets the server's
answer). The session ends when both directions have ended, or after
``min(timeout.client, timeout.server)`` without data either way.

A session that carries bulk data (a read of ``SPLICE_AFTER`` bytes or more,
either way) is handed to the kernel: ``splice.Splice`` relays both
directions socket -> pipe -> socket without copying through Python, with the
same half-close, backpressure, inactivity timeout and byte counts.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from hapymaster.worker import splice
from hapymaster.worker.balance import NO_SERVER, ServerState
from hapymaster.worker.exchange import WRITE_HIGH, Phase

if TYPE_CHECKING:
    from hapymaster.worker.process import FrontendState, Worker

# A read this large says the sender streams faster than one loop pass:
# from then on the session is spliced (HAProxy's splice-auto waits for a
# full buffer the same way). Small exchanges stay on the transports, which
# cost no pipes and no extra descriptors.
SPLICE_AFTER = 65536
# The descriptors of a spliced session beyond its two (a pipe per direction,
# a duplicate of each socket), counted in connections of two descriptors.
SPLICE_COST = 3
# Module globals for the phases this relay goes through (see exchange.Phase).
PARKED, QUEUE, CONNECT, TUNNEL = (int(p) for p in (Phase.PARKED, Phase.QUEUE, Phase.CONNECT,
                                                  Phase.TUNNEL))


class TcpClient(asyncio.Protocol):
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
        self.splice: splice.Splice | None = None
        self.can_splice = splice.AVAILABLE

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
        self.connect_task = asyncio.ensure_future(self._open(server))

    async def _open(self, server: ServerState) -> None:
        try:
            _, srv = await self.w.loop.create_connection(lambda: TcpServer(self), server.host,
                                                         server.port)
        except asyncio.CancelledError:
            return
        except OSError as exc:
            self.connect_task = None
            self.w.note_connect_error(exc)
            self._connect_failed()
            return
        self.connect_task = None
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
            if len(data) >= SPLICE_AFTER and self.can_splice:
                self.start_splice()
        else:
            self.pending.append(data)
            self.transport.pause_reading()

    # --- zero-copy relay ---------------------------------------------------------

    def start_splice(self) -> None:
        """Hand both sockets to a Splice, if both transports have nothing left to write."""
        srv = self.srv
        if (srv is None or self.server_eof or self.transport.is_closing()
                or srv.transport.is_closing() or self.transport.get_write_buffer_size()
                or srv.transport.get_write_buffer_size()):
            return                   # not now: the next large read tries again
        w = self.w
        if w.maxconn and w.cur_conns + SPLICE_COST * (w.spliced + 1) > w.maxconn:
            # maxconn follows the descriptor limit at 2 per connection: the
            # pipes must not take the descriptors that connections at maxconn
            # need (libuv answers EMFILE on accept by dropping the backlog).
            return
        self.can_splice = False
        self.transport.pause_reading()
        srv.transport.pause_reading()
        try:
            self.splice = splice.Splice(self.w.loop, self, self.transport.get_extra_info("socket"),
                                        srv.transport.get_extra_info("socket"), self.client_eof)
        except OSError:
            # Out of descriptors (a pipe and a duplicate per direction): the
            # transports keep relaying this session, only slower.
            self.transport.resume_reading()
            srv.transport.resume_reading()
            return
        w.spliced += 1
        self.splice.start()

    def spliced(self, n: int, outbound: bool) -> None:
        self.t_io = self.w.clock()
        if outbound:
            self.bytes_out += n
        else:
            self.bytes_in += n

    def splice_done(self) -> None:
        """Both directions ended (each end of stream passed on): the session is over."""
        self.client_eof = self.server_eof = True
        self._end_splice(abort=False)

    def splice_failed(self, exc: OSError) -> None:
        """A reset or a broken pipe on either socket: the session is over, both sides cut."""
        self._end_splice(abort=True)

    def _close_splice(self) -> None:
        relay, self.splice = self.splice, None
        if relay is not None:
            relay.close()
            self.w.spliced -= 1

    def _end_splice(self, abort: bool) -> None:
        self._close_splice()
        srv = self.srv
        for transport in ((srv.transport if srv is not None else None), self.transport):
            if transport is None or transport.is_closing():
                continue
            if abort:
                transport.abort()
            else:
                transport.close()

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
        if self.srv is not None and self.splice is None:
            self.srv.transport.pause_reading()

    def resume_writing(self) -> None:
        self.t_io = self.w.clock()
        if self.srv is not None and self.splice is None:
            self.srv.transport.resume_reading()

    def abort(self) -> None:
        if self.splice is not None:
            self._end_splice(abort=True)
        elif self.transport is not None:
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
        self._close_splice()         # its duplicates would keep the sockets open
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
        self._close_splice()
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


class TcpServer(asyncio.Protocol):
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
        if len(data) >= SPLICE_AFTER and client.can_splice:
            client.start_splice()

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
        if self.client is not None and self.client.splice is None:
            self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.client is not None and self.client.splice is None:
            self.client.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.server_lost()


def tcp_client_factory(worker: "Worker", frontend: "FrontendState") -> asyncio.BaseProtocol:
    """The protocol of one client connection on a TCP frontend."""
    return TcpClient(worker, frontend)
