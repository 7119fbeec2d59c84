"""The HTTP/1.1 reverse proxy: one client Protocol, one server Protocol.

A client connection (``HttpClient``) parses requests with httptools, picks a
backend (routes, then ``default_backend``) and a server per request, borrows
an idle keep-alive connection to that server from the worker-wide pool (or
opens one), sends the rewritten request head, then streams the body as it
arrives. The server connection (``HttpServer``) parses the response and
streams it back. Back-pressure is transport to transport: a full write buffer
on one side pauses reading on the other. Nothing buffers a whole body.

Requests pipelined by the client are parsed as they come but served one at a
time, in order: the client's reading is paused while a request waits behind
another, so at most one read's worth is held.

Timeouts are not timers: each connection records its phase, a deadline and
the time of its last I/O, and the worker's sweeper (``process.Worker``) calls
``expire()`` when a limit is passed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import httptools

from hapymaster.worker.balance import NO_SERVER, BackendState, ServerState
from hapymaster.worker.errors import ERROR_RESPONSES

if TYPE_CHECKING:
    from hapymaster.worker.process import FrontendState, Worker

log = logging.getLogger("hapymaster.worker")
access_log = logging.getLogger("hapymaster.access")

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade

# Limits in the spirit of HAProxy's tune.bufsize (16 kB): a request line
# longer than MAX_URL gets 414, a header section beyond MAX_HEAD or more than
# MAX_HEADERS fields gets 431.
MAX_URL = 8192
MAX_HEAD = 16384
MAX_HEADERS = 100
# Body bytes held for a request whose server connection is not there yet
# (connecting, queued, pipelined): beyond this, stop reading the client.
MAX_PENDING = 262144
# Up to this much of a request body still on its way after the server's
# answer is read and dropped to keep the client connection; more: close.
MAX_DRAIN = 16 << 20
WRITE_HIGH = 262144
MAX_IDLE_PER_SERVER = 256

# Headers that concern one hop only (RFC 9110 7.6.1) and are never forwarded;
# the proxy writes its own framing and connection management.
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))
# A Connection header cannot make these disappear: they frame or route the request.
_NEVER_HOP = frozenset((b"host", b"content-length", b"close", b"keep-alive", b"upgrade"))
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate"))
# Response headers response_head() must look at: the hop-by-hop ones and the
# framing. HttpServer.on_header sets them aside as they are parsed, so that
# the usual five or six headers are lowered and classified once.
_RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}

# Client connection phases (what the sweeper checks).
P_HEAD = 1        # waiting for a complete request head: timeout.http_request -> 408
P_IDLE = 2        # keep-alive, between requests: timeout.http_keep_alive -> close
P_QUEUE = 3       # waiting for a server slot: timeout.queue -> 503
P_CONNECT = 4     # connecting to the server: timeout.connect -> retry, then 503
P_BODY = 5        # request body still arriving: timeout.client (inactivity) -> 408
P_WAIT = 6        # request sent, response expected/streaming: timeout.server -> 504
P_TUNNEL = 7      # Upgrade tunnel: timeout.tunnel (inactivity) -> close
P_PARKED = 8      # accepted beyond maxconn, waiting for a slot
P_DRAIN = 9       # answered before its body ended: dropping the rest, timeout.client -> close

# Pause reasons for the client's reading (bit flags, reading resumes when none is left).
R_PIPE = 1        # a pipelined request waits behind the current one
R_PENDING = 2     # body held while the server connection is not ready
R_SERVER = 4      # the server connection's write buffer is full
R_PARKED = 8      # accepted beyond maxconn
R_UPGRADE = 16    # upgrade asked: wait for the server's 101 before reading more
R_BAD = 32        # invalid pipelined request: answered with an error once the earlier ones are


class Request:
    """One request on a client connection, from its first byte to its last.

    Immutable defaults live on the class: creating a request (once per
    request, on the hot path) sets only what must be per instance.
    """

    url = b""
    head_size = 0
    method = b""
    version = "1.1"
    keep_alive = True
    chunked = False
    has_body = False
    complete = False
    headers_done = False
    pending_size = 0
    streaming = False
    upgrade = False
    backend: BackendState | None = None
    server: ServerState | None = None
    server_last: ServerState | None = None
    conn: "HttpServer | None" = None
    retries = 0
    status = 0
    bytes_in = 0
    bytes_out = 0
    body_size = 0
    body_left = -2        # bytes of a Content-Length body still to come; -2: not looked yet
    t_head = -1.0
    t_queue = -1.0
    t_connect = -1.0
    t_response = -1.0
    host = b""
    resp_started = False
    resp_chunked = False
    resp_close = False
    resp_nobody = False
    client_ka = True
    leftover = b""
    term = "--"
    logged = False

    # Body chunks held until the server connection is ready: a tuple (never
    # appended to) until on_body needs a list; most requests have no body.
    pending: "list[bytes] | tuple[()]" = ()

    def __init__(self, now: float):
        self.t_start = now
        self.headers: list[tuple[bytes, bytes]] = []


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The body length a request head announces; -1 when it is chunked or not said."""
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return -1
        if lname == b"content-length":
            length = int(value)
    return length


class _ParseStop(Exception):
    """Raised from a parser callback to answer ``code`` and stop reading."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class HttpClient(asyncio.Protocol):
    """The client side of an HTTP frontend connection."""

    def __init__(self, worker: "Worker", frontend: "FrontendState"):
        self.w = worker
        self.fe = frontend
        self.transport: Any = None
        self.parser = httptools.HttpRequestParser(self)
        self.reqs: deque[Request] = deque()   # [0] is served, the rest are pipelined
        self.req: Request | None = None       # the request the parser is filling
        self.srv: HttpServer | None = None    # server connection of reqs[0]
        self.paused = 0
        self.write_paused = False
        self.closed = False
        self.tunnel = False
        self.phase = P_HEAD
        self.deadline = 0.0
        self.t_io = 0.0
        self.peer: tuple[str, int] = ("", 0)
        self.client_key = b""
        self.requests_served = 0
        self.connect_task: asyncio.Future | None = None
        self.t_accept = 0.0
        # Writes to the client gathered while one server read is parsed
        # (head + body + end in one send instead of three); None: write now.
        self.out: list[bytes] | None = None
        self.forwarding: bytes | None = None
        self.raw_body = False   # the rest of self.req's body bypasses the parser
        # An invalid request pipelined behind ones being served: its error
        # code, answered (and the connection closed) when they are done.
        self.bad_code = 0

    # --- connection life ------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (peer[0], peer[1])
            self.client_key = peer[0].encode()
        now = self.w.clock()
        self.t_accept = now
        self.t_io = now
        if not self.w.admit(self, self.fe):
            self.phase = P_PARKED
            self._pause(R_PARKED)
            return
        self.start()

    def start(self) -> None:
        """Called once the connection holds a maxconn slot."""
        now = self.w.clock()
        self.phase = P_HEAD
        self.deadline = now + self.fe.timeout.http_request
        self._resume(R_PARKED)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.phase == P_QUEUE and self.reqs and self.reqs[0].backend is not None:
            self.reqs[0].backend.dequeue(self)
        for req in self.reqs:
            self._release_server(req)
            if req.headers_done and not req.logged:
                # Gone before its answer ended (a download cut short counts
                # too): a client abort, on the backend and server rows.
                req.term = "CD" if req.resp_started else ("CH" if req.streaming else "CR")
                self._finish_log(req, aborted=True)
        self.reqs.clear()
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.client = None
            srv.close()
        self.w.release_conn(self, self.fe)

    def close(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            out = self.out
            if out:
                self.out = []
                transport.writelines(out)
            transport.close()

    def abort(self) -> None:
        self.out = None
        if self.transport is not None:
            self.transport.abort()

    def _send(self, data: bytes) -> None:
        """Write to the client; while a server read is parsed, gather into one write."""
        out = self.out
        if out is None:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
        else:
            out.append(data)

    def _pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.srv is not None and self.srv.transport is not None:
            self.srv.transport.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.t_io = self.w.clock()
        if self.srv is not None and self.srv.transport is not None:
            self.srv.transport.resume_reading()

    def eof_received(self) -> bool:
        # A client that half-closes after its request still gets its answer;
        # with nothing in flight there is nothing left to do.
        if self.tunnel and self.srv is not None:
            if self.srv.transport.can_write_eof():
                self.srv.transport.write_eof()
            return True
        if self.reqs and self.reqs[0].complete:
            # Requests fully received are answered; nothing more can come.
            for req in self.reqs:
                req.client_ka = False
            return True
        return False

    # --- reading the client ---------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.t_io = self.w.clock()
        if self.raw_body:
            self._pass_body(data)
            return
        if self.tunnel:
            req = self.reqs[0]
            req.bytes_in += len(data)
            self.srv.transport.write(data)
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            self._upgrade_requested(data[exc.args[0]:])
        except _ParseStop as exc:
            self._bad_request(exc.code)
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _ParseStop):
                self._bad_request(cause.code)
            else:
                self._bad_request(400)
        else:
            req = self.req
            if req is not None and req.body_left > 0 and not req.upgrade:
                # The rest of this body is only bytes to count: take them as
                # they come, without copying them through the parser again.
                self.raw_body = True

    def _pass_body(self, data: bytes) -> None:
        req = self.req
        left = req.body_left
        rest = b""
        if len(data) > left:
            data, rest = data[:left], data[left:]
        try:
            self.on_body(data)
        except _ParseStop as exc:
            self._bad_request(exc.code)
            return
        if req.body_left == 0:
            self.raw_body = False
            # The old parser stopped in the middle of this body.
            self.parser = httptools.HttpRequestParser(self)
            self.on_message_complete()
            if rest and not self.closed:
                self.data_received(rest)   # a pipelined request

    # The parser callbacks run inside data_received, which has just read the
    # clock into t_io: they take the time from there instead of again.

    def on_message_begin(self) -> None:
        now = self.t_io
        req = Request(now)
        reqs = self.reqs
        reqs.append(req)
        self.req = req
        if len(reqs) > 1:
            self._pause(R_PIPE)
        elif self.phase == P_IDLE:
            self.phase = P_HEAD
            self.deadline = now + self.fe.timeout.http_request

    def on_url(self, url: bytes) -> None:
        req = self.req
        req.url += url
        if len(req.url) > MAX_URL:
            raise _ParseStop(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        if req.headers_done:
            return  # trailers of a chunked body: not forwarded
        req.headers.append((name, value))
        req.head_size += len(name) + len(value) + 4
        if req.head_size > MAX_HEAD or len(req.headers) > MAX_HEADERS:
            raise _ParseStop(431)

    def on_headers_complete(self) -> None:
        req = self.req
        parser = self.parser
        req.headers_done = True
        req.t_head = self.t_io
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        if req.version not in ("1.1", "1.0"):
            raise _ParseStop(400)
        # keep_alive and upgrade default to True and False on the class.
        if not parser.should_keep_alive():
            req.keep_alive = False
        if parser.should_upgrade():
            req.upgrade = True
        if req.method == b"CONNECT":
            raise _ParseStop(405)
        limit = self.fe.max_body_size
        if limit:
            for name, value in req.headers:
                if name.lower() == b"content-length" and int(value) > limit:
                    raise _ParseStop(413)
        if req is self.reqs[0]:
            self._dispatch(req)

    def on_body(self, body: bytes) -> None:
        req = self.req
        size = len(body)
        left = req.body_left
        if left == -2:
            left = _content_length(req.headers)
        req.body_left = left - size if left >= 0 else -1
        req.bytes_in += size
        if self.fe.max_body_size:
            req.body_size += size
            if req.body_size > self.fe.max_body_size:
                raise _ParseStop(413)
        if req.streaming:
            conn = req.conn
            if conn is None:
                return      # draining: the server has answered already
            if req.chunked:
                conn.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                conn.transport.write(body)
        else:
            if req.pending:
                req.pending.append(body)
            else:
                req.pending = [body]
            req.pending_size += size
            if req.pending_size > MAX_PENDING:
                self._pause(R_PENDING)

    def on_message_complete(self) -> None:
        req = self.req
        self.req = None
        req.complete = True
        if self.phase == P_DRAIN:
            self._next_request()
        elif req.streaming:
            if req.chunked:
                req.conn.transport.write(b"0\r\n\r\n")
            if self.phase == P_BODY:
                self.phase = P_WAIT
                self.t_io = self.w.clock()

    def _upgrade_requested(self, rest: bytes) -> None:
        # httptools stops at the end of an Upgrade (or CONNECT) request head:
        # what follows belongs to the new protocol if the server agrees (101),
        # or is the next request if it does not.
        req = self.reqs[-1] if self.reqs else None
        if req is None:
            self._bad_request(400)
            return
        req.leftover = rest
        self._pause(R_UPGRADE)

    def _bad_request(self, code: int) -> None:
        """The client sent something we will not forward: answer ``code`` and close."""
        self.fe.counters.ereq += 1
        reqs = self.reqs
        if reqs and reqs[0] is not self.req:
            # Pipelined behind requests received whole (reqs[0] may be
            # streaming its answer: a page now would land inside that body).
            # Those are answered first; then the error, then the close.
            if reqs[-1] is self.req:
                reqs.pop()
            self.req = None
            self.raw_body = False
            self.bad_code = code
            self._pause(R_BAD)
            return
        req = reqs[0] if reqs else Request(self.w.clock())
        req.term = "PR"
        self._error(req, code)

    # --- choosing the server --------------------------------------------------

    def _dispatch(self, req: Request) -> None:
        """reqs[0] has its head: route it and find it a server connection."""
        backend = self.fe.route(req)
        req.backend = backend
        if req.upgrade:
            self._pause(R_UPGRADE)
        self._take_server(req)

    def _take_server(self, req: Request) -> None:
        server = req.backend.take(self, self.client_key)
        if server is None:
            self.phase = P_QUEUE
            self.deadline = self.w.clock() + req.backend.timeout.queue
            return
        if server is NO_SERVER:
            req.term = "SC"
            self._error(req, 503)
            return
        self._use_server(req, server)

    def on_server(self, server: ServerState | None) -> None:
        """The backend queue gave us a server (or None: every server left)."""
        if not self.reqs or self.closed:
            if server is not None:
                server.backend.release(server)
            return
        req = self.reqs[0]
        req.t_queue = self.w.clock()
        if server is None:
            req.term = "SQ"
            self._error(req, 503)
            return
        self._use_server(req, server)

    def _use_server(self, req: Request, server: ServerState) -> None:
        req.server = server
        now = self.w.clock()
        if req.t_queue < 0:
            req.t_queue = now
        idle = server.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                conn.reused = True
                req.t_connect = now
                self._attach(req, conn, now)
                return
        self._connect(req, server)

    def _connect(self, req: Request, server: ServerState) -> None:
        self.phase = P_CONNECT
        self.deadline = self.w.clock() + req.backend.timeout.connect
        self.connect_task = asyncio.ensure_future(self._open(req, server))

    async def _open(self, req: Request, server: ServerState) -> None:
        loop = self.w.loop
        try:
            _, conn = await loop.create_connection(lambda: HttpServer(self.w, server),
                                                   server.host, server.port)
        except asyncio.CancelledError:
            return
        except OSError as exc:
            self.connect_task = None
            self._connect_failed(req, f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        self.connect_task = None
        if self.closed or not self.reqs or self.reqs[0] is not req:
            conn.close()
            return
        now = req.t_connect = self.w.clock()
        self._attach(req, conn, now)

    def _connect_failed(self, req: Request, why: str) -> None:
        server = req.server
        server.counters.econ += 1
        req.backend.counters.econ += 1
        self._release_server(req)
        if req.retries < 3 and not self.closed:
            # Like HAProxy's "retries 3" with "option redispatch": try again,
            # letting the algorithm pick (the failed server is not excluded,
            # but round robin and friends move on).
            req.retries += 1
            server.counters.wretr += 1
            self._take_server(req)
            return
        req.term = "SC"
        self._error(req, 503)

    def _attach(self, req: Request, conn: "HttpServer", now: float) -> None:
        """Send the request head (and any held body) on ``conn``."""
        self.srv = conn
        req.conn = conn
        conn.client = self
        conn.req = req
        conn.start_response()
        if self.write_paused:
            conn.transport.pause_reading()
        head = self._request_head(req)
        transport = conn.transport
        if req.pending:
            if req.chunked:
                parts = [head]
                for chunk in req.pending:
                    parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                if req.complete:
                    parts.append(b"0\r\n\r\n")
                transport.writelines(parts)
            else:
                transport.writelines([head, *req.pending])
            req.pending = ()
            req.pending_size = 0
            self._resume(R_PENDING)
        else:
            if req.complete and req.chunked:
                head += b"0\r\n\r\n"
            transport.write(head)
        req.streaming = True
        self.t_io = now
        if req.complete:
            self.phase = P_WAIT
        else:
            self.phase = P_BODY

    def _request_head(self, req: Request) -> bytes:
        """The request line and headers as sent to the server.

        Hop-by-hop headers (and those named by Connection) are dropped, the
        framing is restated, X-Forwarded-For / X-Forwarded-Proto / Forwarded
        are added. The server side always speaks HTTP/1.1 with keep-alive.
        """
        lines = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
        extra_hop: tuple[bytes, ...] = ()
        upgrade_value = b""
        chunked = False
        content_length = None
        for name, value in req.headers:
            lname = name.lower()
            if lname in HOP_BY_HOP:
                if lname == b"connection":
                    if value.lower() not in _PLAIN_CONNECTION:
                        extra_hop += tuple(t.strip().lower() for t in value.split(b","))
                elif lname == b"transfer-encoding":
                    chunked = True
                elif lname == b"upgrade":
                    upgrade_value = value
                continue
            if lname == b"content-length":
                content_length = value
            elif lname == b"host":
                req.host = value
            lines += (name, b": ", value, b"\r\n")
        if extra_hop:
            extra_hop = tuple(t for t in extra_hop if t not in _NEVER_HOP)
        if extra_hop:
            # Drop what the client's Connection header declared hop-by-hop.
            kept = [req.method, b" ", req.url, b" HTTP/1.1\r\n"]
            for name, value in req.headers:
                lname = name.lower()
                if lname in HOP_BY_HOP or lname in extra_hop:
                    continue
                kept += (name, b": ", value, b"\r\n")
            lines = kept
        if chunked:
            req.chunked = req.has_body = True
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif content_length is not None and content_length != b"0":
            req.has_body = True
        if req.upgrade and upgrade_value:
            lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
        forwarding = self.forwarding
        if forwarding is None:
            forwarding = self.forwarding = self._forwarding_headers()
        lines.append(forwarding)
        head = b"".join(lines)
        req.bytes_in += len(head)
        return head

    def _forwarding_headers(self) -> bytes:
        """X-Forwarded-For/-Proto and Forwarded, the same for every request of a connection."""
        fe = self.fe
        ip = self.peer[0]
        text = ""
        if fe.x_forwarded_for:
            text += f"X-Forwarded-For: {ip}\r\n"
        if fe.x_forwarded_proto:
            text += "X-Forwarded-Proto: http\r\n"
        if fe.forwarded:
            node = f'"[{ip}]"' if ":" in ip else ip
            text += f"Forwarded: for={node};proto=http\r\n"
        return (text + "\r\n").encode("latin-1")

    # --- the response ---------------------------------------------------------

    def response_head(self, conn: "HttpServer", status: int) -> None:
        req = conn.req
        if status < 200 and status != 101:
            # Interim responses (100 Continue, 103) go to HTTP/1.1 clients only.
            if req.version == "1.1":
                self._send(b"HTTP/1.1 %d %s\r\n\r\n" % (status, conn.reason or b"Continue"))
            return
        req.t_response = self.t_io   # set by HttpServer.data_received, which parses this head
        req.status = status
        req.resp_started = True
        method = req.method
        nobody = method == b"HEAD" or status in (204, 304)
        client_ka = req.keep_alive and req.client_ka and not self.w.stopping
        chunked = False
        has_length = False
        upgrade = b""
        extra_hop: tuple[bytes, ...] = ()
        for lname, value in conn.special:
            if lname == b"content-length":
                has_length = True
                length = value
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"connection":
                if value.lower() not in _PLAIN_CONNECTION:
                    extra_hop += tuple(t.strip().lower() for t in value.split(b","))
            elif lname == b"upgrade":
                upgrade = value
        lines = conn.fwd
        if extra_hop:
            # Drop what the server's Connection header declared hop-by-hop.
            lines = [lines[i + j] for i in range(1, len(lines), 4)
                     if lines[i].lower() not in extra_hop for j in range(4)]
            lines.insert(0, b"")
        lines[0] = b"HTTP/1.1 %d %s\r\n" % (status, conn.reason)
        if status == 101:
            if not req.upgrade:
                req.term = "SH"
                self._server_error(conn, 502)
                return
            lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
            head = b"".join(lines)
            req.bytes_out += len(head)
            self._send(head)
            return
        req.resp_nobody = nobody
        if nobody:
            pass
        elif has_length and not chunked:
            conn.body_left = int(length)
        elif chunked:
            if req.version == "1.1":
                lines.append(b"Transfer-Encoding: chunked\r\n")
                req.resp_chunked = True
            else:
                client_ka = False
        elif not has_length:
            # Body delimited by the server closing: HTTP/1.1 clients get it
            # chunked (and keep their connection), HTTP/1.0 ones get a close.
            req.resp_close = True
            if req.version == "1.1":
                lines.append(b"Transfer-Encoding: chunked\r\n")
                req.resp_chunked = True
            else:
                client_ka = False
        if not conn.keep_alive:
            req.resp_close = req.resp_close or not (nobody or chunked or has_length)
        req.client_ka = client_ka
        if not client_ka:
            lines.append(b"Connection: close\r\n\r\n")
        elif req.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n\r\n")
        else:
            lines.append(b"\r\n")
        head = b"".join(lines)
        req.bytes_out += len(head)
        self._send(head)
        if nobody and method == b"HEAD":
            # httptools cannot be told that a HEAD response has no body: end
            # the exchange here and give the connection a fresh parser.
            conn.fresh_parser = True
            self.response_done(conn)

    def response_body(self, conn: "HttpServer", body: bytes) -> None:
        req = conn.req
        req.bytes_out += len(body)
        out = self.out
        if out is None:
            if req.resp_chunked:
                self.transport.writelines((b"%x\r\n" % len(body), body, b"\r\n"))
            else:
                self.transport.write(body)
        elif req.resp_chunked:
            out += (b"%x\r\n" % len(body), body, b"\r\n")
        else:
            out.append(body)

    def response_done(self, conn: "HttpServer") -> None:
        """The server finished its response: log, recycle, serve the next request."""
        req = conn.req
        if req is None or req.status == 0:
            return
        if req.resp_chunked:
            self._send(b"0\r\n\r\n")
        conn.req = None
        conn.client = None
        self.srv = None
        reusable = conn.keep_alive and req.complete and not req.resp_close
        server = req.server
        self._release_server(req)
        if reusable and server is not None:
            conn.make_idle(server)
        else:
            conn.close()
        self._finish_log(req)
        self.reqs.popleft()
        self.requests_served += 1
        if not req.client_ka:
            self.close()
            return
        if not req.complete:
            self._drain(req)
            return
        if req.upgrade:
            # An Upgrade the server declined: httptools stopped at its head,
            # so parse what followed (the next requests) with a new parser.
            self.parser = httptools.HttpRequestParser(self)
            self._resume(R_UPGRADE)
            leftover, req.leftover = req.leftover, b""
            self.phase = P_IDLE
            self.deadline = self.w.clock() + self.fe.timeout.http_keep_alive
            if leftover:
                self.data_received(leftover)
            return
        self._next_request()

    def _drain(self, req: Request) -> None:
        """The server answered before the request body ended (RFC 9112 9.3 allows
        it): read the rest and drop it, so that the client, still sending,
        is not cut off and keeps its connection, as with HAProxy."""
        if req.body_left == -2:     # answered before a byte of the body came
            req.body_left = _content_length(req.headers)
        if not 0 < req.body_left <= MAX_DRAIN or req.upgrade:
            self.close()
            return
        req.conn = None     # with streaming set: on_body drops what comes
        self.phase = P_DRAIN
        self._resume(R_PENDING | R_SERVER)

    def _next_request(self) -> None:
        """The connection is free: serve a pipelined request or wait for one."""
        if self.reqs:
            nxt = self.reqs[0]
            if nxt.headers_done:
                self.w.loop.call_soon(self._dispatch_next, nxt)
            else:
                self.phase = P_HEAD
                self.deadline = self.w.clock() + self.fe.timeout.http_request
            if len(self.reqs) == 1:
                self._resume(R_PIPE)
        elif self.bad_code:
            req = Request(self.w.clock())
            req.term = "PR"
            self._error(req, self.bad_code)
        else:
            self.phase = P_IDLE
            self.deadline = self.w.clock() + self.fe.timeout.http_keep_alive
            self._resume(R_PIPE)
            if self.w.stopping:
                # Its response went out with keep-alive just before the
                # soft stop: the client may already be sending the next one.
                self._idle_until_grace_ends()

    def _dispatch_next(self, req: Request) -> None:
        if not self.closed and self.reqs and self.reqs[0] is req and not req.resp_started:
            self._dispatch(req)

    def start_tunnel(self, conn: "HttpServer", rest: bytes) -> None:
        """The server answered 101: from now on bytes flow unparsed both ways."""
        req = conn.req
        self.tunnel = True
        conn.tunnel = True
        self.phase = P_TUNNEL
        self.t_io = self.w.clock()
        if rest:
            req.bytes_out += len(rest)
            self._send(rest)
        if req.leftover:
            req.bytes_in += len(req.leftover)
            conn.transport.write(req.leftover)
            req.leftover = b""
        self._resume(R_UPGRADE)
        self._resume(R_PIPE)

    def server_lost(self, conn: "HttpServer", exc: Exception | None) -> None:
        """The server connection closed while serving reqs[0]."""
        req = conn.req
        conn.req = None
        conn.client = None
        if self.srv is conn:
            self.srv = None
        if req is None or self.closed:
            return
        if self.tunnel:
            self._release_server(req)
            self._finish_log(req)
            self.close()
            return
        if req.resp_started:
            if req.resp_close and req.status:
                self.response_done_close(conn, req)
                return
            if self.transport.is_closing():
                # We aborted the server connection because the client had
                # gone (HttpServer._pass_body): its abort, not the server's.
                req.term = "CD"
                self._release_server(req)
                self._finish_log(req, aborted=True)
                self.abort()
                return
            req.term = "SD"
            req.server.counters.srv_abrt += 1
            self._release_server(req)
            self._finish_log(req)
            self.abort()
            return
        if conn.reused and not conn.got_data and not req.has_body and not req.upgrade:
            # A kept-alive connection the server had just closed: the request
            # never reached it. Send it again on a fresh connection.
            req.streaming = False
            req.bytes_in = 0
            self._connect(req, req.server)
            return
        req.term = "SH"
        self._server_error(conn, 502)

    def response_done_close(self, conn: "HttpServer", req: Request) -> None:
        conn.req = req
        conn.keep_alive = False
        self.response_done(conn)

    def _server_error(self, conn: "HttpServer", code: int) -> None:
        req = conn.req or (self.reqs[0] if self.reqs else None)
        if req is None:
            self.close()
            return
        if req.server is not None:
            req.server.counters.eresp += 1
        if req.backend is not None:
            req.backend.counters.eresp += 1
        conn.req = None
        conn.client = None
        conn.close()
        if self.srv is conn:
            self.srv = None
        if req.resp_started:
            self._release_server(req)
            self._finish_log(req)
            self.abort()
            return
        self._error(req, code)

    # --- ending ---------------------------------------------------------------

    def _release_server(self, req: Request) -> None:
        server = req.server
        if server is not None:
            req.server = None
            server.backend.release(server)
            req.server_last = server

    def _error(self, req: Request, code: int) -> None:
        """Answer ``code`` with the small HAProxy-like page and close."""
        if self.phase == P_QUEUE and req.backend is not None:
            req.backend.dequeue(self)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._release_server(req)
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.req = None
            srv.client = None
            srv.close()
        req.status = code
        body = ERROR_RESPONSES[code]
        req.bytes_out += len(body)
        self._send(body)
        if req.headers_done or code in (400, 408, 414, 431):
            self._finish_log(req)
        self.reqs.clear()
        self.close()

    def _finish_log(self, req: Request, aborted: bool = False) -> None:
        req.logged = True
        fe = self.fe
        counters = fe.counters
        counters.req_tot += 1
        counters.bin += req.bytes_in
        counters.bout += req.bytes_out
        status = req.status
        # The usual 2xx is counted here; Counters.status() sorts the rest.
        ok = 200 <= status < 300
        if ok:
            counters.hrsp_2xx += 1
        elif status:
            counters.status(status)
        backend = req.backend
        server = req.server_last
        if backend is not None:
            bc = backend.counters
            bc.req_tot += 1
            bc.bin += req.bytes_in
            bc.bout += req.bytes_out
            if ok:
                bc.hrsp_2xx += 1
            elif status:
                bc.status(status)
            if aborted:
                bc.cli_abrt += 1
        if server is not None:
            sc = server.counters
            sc.stot += 1
            sc.bin += req.bytes_in
            sc.bout += req.bytes_out
            if ok:
                sc.hrsp_2xx += 1
            elif status:
                sc.status(status)
            if aborted:
                sc.cli_abrt += 1
        if fe.access_log:
            self._log_line(req, server)

    def _log_line(self, req: Request, server: ServerState | None) -> None:
        # HAProxy's httplog: client, date, frontend, backend/server,
        # TR/Tw/Tc/Tr/Ta, status, bytes, cookies, termination state,
        # actconn/feconn/beconn/srv_conn/retries, srv_queue/backend_queue, request.
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

    # --- timeouts -------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Called by the sweeper on every tick."""
        phase = self.phase
        if phase == P_WAIT:
            if now - self.t_io >= self._server_timeout():
                req = self.reqs[0] if self.reqs else None
                if req is None:
                    self.close()
                elif req.resp_started:
                    req.term = "sD"
                    self._release_server(req)
                    self._finish_log(req)
                    self.abort()
                else:
                    req.term = "sH"
                    if req.server is not None:
                        req.server.counters.eresp += 1
                    self._error(req, 504)
            return
        if phase == P_BODY:
            if now - self.t_io >= self.fe.timeout.client:
                req = self.reqs[0]
                req.term = "cD"
                if req.resp_started:
                    self.abort()
                else:
                    self._error(req, 408)
            return
        if phase == P_TUNNEL:
            if now - self.t_io >= self._tunnel_timeout():
                self.close()
            return
        if phase == P_DRAIN:
            if now - self.t_io >= self.fe.timeout.client:
                self.close()
            return
        if phase == P_PARKED or now < self.deadline:
            return
        if phase == P_HEAD:
            req = self.reqs[0] if self.reqs else Request(self.t_accept)
            req.term = "cR"
            self._error(req, 408)
        elif phase == P_IDLE:
            self.close()
        elif phase == P_QUEUE:
            req = self.reqs[0]
            req.term = "sQ"
            self._error(req, 503)
        elif phase == P_CONNECT:
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
            self._connect_failed(self.reqs[0], "timeout")

    def _server_timeout(self) -> float:
        req = self.reqs[0] if self.reqs else None
        if req is not None and req.backend is not None:
            return req.backend.timeout.server
        return self.fe.timeout.server

    def _tunnel_timeout(self) -> float:
        req = self.reqs[0] if self.reqs else None
        if req is not None and req.backend is not None:
            return req.backend.timeout.tunnel
        return self.fe.timeout.tunnel

    def soft_stop(self) -> None:
        """The worker is leaving: busy connections close after their response,
        idle ones after a grace.

        Closing an idle keep-alive connection at once races with a client
        that is sending its next request at that instant: it gets an EOF or
        a reset instead of an answer (wrk counted ~1,700 read errors in 18
        reloads). So an idle connection is kept ``soft_stop_grace`` longer:
        a request that comes is answered with ``Connection: close``
        (response_head sees ``w.stopping``), and only a connection that
        stayed idle for the whole grace is closed (HAProxy's
        idle-close-on-response). A connection still waiting for its first
        request is treated the same way: the kernel handed it over just
        before the stop and its request may be on the way.
        """
        if not self.reqs and self.phase in (P_IDLE, P_HEAD):
            self._idle_until_grace_ends()

    def _idle_until_grace_ends(self) -> None:
        grace = self.w.soft_stop_grace
        if grace <= 0:
            self.close()
            return
        self.phase = P_IDLE
        self.deadline = min(self.deadline, self.w.clock() + grace)


class HttpServer(asyncio.Protocol):
    """A connection to one server; in the pool when idle."""

    def __init__(self, worker: "Worker", server: ServerState):
        self.w = worker
        self.server = server
        self.transport: Any = None
        self.client: HttpClient | None = None
        self.req: Request | None = None
        self.parser = httptools.HttpResponseParser(self)
        # The response head as parsed: the lines to forward as they are
        # (name, ": ", value, CRLF; slot 0 is kept for the status line) and,
        # lowered, the headers that decide framing and connection handling.
        self.fwd: list[bytes] = [b""]
        self.special: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.keep_alive = True
        self.reused = False
        self.got_data = False
        self.idle = False
        self.tunnel = False
        self.fresh_parser = False
        self.in_head = True
        self.closed = False
        # Bytes of a Content-Length body still to come (-1: none known; set
        # by HttpClient.response_head) and whether they are passed to the
        # client without the parser.
        self.body_left = -1
        self.raw_body = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH)

    def start_response(self) -> None:
        if self.fresh_parser:
            self.parser = httptools.HttpResponseParser(self)
            self.fresh_parser = False
        self.idle = False
        self.got_data = False
        self.fwd = [b""]
        self.special = []
        self.reason = b""
        self.in_head = True
        self.body_left = -1

    def make_idle(self, server: ServerState) -> None:
        if self.closed or len(server.idle) >= MAX_IDLE_PER_SERVER or not server.usable \
                or self.w.stopping:
            self.close()
            return
        self.idle = True
        self.transport.resume_reading()
        server.idle.append(self)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:
            # Nothing asked: a server closing its idle connection says so
            # with data sometimes (a 408); drop the connection.
            self.transport.abort()
            return
        self.got_data = True
        client.t_io = self.w.clock()
        if self.raw_body:
            self._pass_body(client, data)
            return
        if self.tunnel:
            self.req.bytes_out += len(data)
            client.transport.write(data)
            return
        out = client.out = []
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.req is not None and self.req.status == 101:
                client.start_tunnel(self, data[exc.args[0]:])
            else:
                client._server_error(self, 502)
        except HttpParserError:
            if self.client is not None:
                if self.req is not None:
                    self.req.term = "SH"
                self.client._server_error(self, 502)
            else:
                self.close()
        if client.out is out:
            client.out = None
            if out:
                transport = client.transport
                if not transport.is_closing():
                    transport.writelines(out)
        if self.body_left > 0 and self.client is not None:
            # The rest of this body is only bytes to count: hand them over
            # as they come, without copying them through the parser again.
            self.raw_body = True

    def _pass_body(self, client: HttpClient, data: bytes) -> None:
        transport = client.transport
        if transport.is_closing():
            # The client is gone; its connection_lost has not run yet.
            self.transport.abort()
            return
        left = self.body_left
        size = len(data)
        req = self.req
        if size < left:
            self.body_left = left - size
            req.bytes_out += size
            transport.write(data)
            return
        if size > left:
            # More than the response: the server is confused; do not reuse it.
            data = data[:left]
            self.keep_alive = False
        req.bytes_out += left
        transport.write(data)
        self.raw_body = False
        self.body_left = -1
        self.fresh_parser = True   # the old one stopped in the middle of this body
        client.response_done(self)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            lname = name.lower()
            if lname in _RESPONSE_SPECIAL:
                self.special.append((lname, value))
                if lname in HOP_BY_HOP:
                    return
            self.fwd += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        client = self.client
        if status < 200 and status != 101:
            client.response_head(self, status)
            self.fwd = [b""]
            self.special = []
            self.reason = b""
            return
        self.in_head = False
        self.keep_alive = self.parser.should_keep_alive()
        client.response_head(self, status)

    def on_body(self, body: bytes) -> None:
        self.body_left -= len(body)
        client = self.client
        if client is not None and self.req is not None:
            client.response_body(self, body)

    def on_message_complete(self) -> None:
        if self.in_head:
            return  # the end of an interim (1xx) response
        self.body_left = -1
        client = self.client
        if client is not None and self.req is not None and self.req.status != 101:
            client.response_done(self)

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client._pause(R_SERVER)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client._resume(R_SERVER)

    def eof_received(self) -> bool:
        if self.tunnel and self.client is not None:
            transport = self.client.transport
            if transport.can_write_eof():
                transport.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle:
            try:
                self.server.idle.remove(self)
            except ValueError:
                pass
            return
        if self.client is not None:
            self.client.server_lost(self, exc)


_last_log_second = 0
_last_log_date = ""


def _log_date() -> str:
    """``25/Nov/2026:13:30:00.123`` as in HAProxy's logs, cached per second."""
    global _last_log_second, _last_log_date
    now = time.time()
    second = int(now)
    if second != _last_log_second:
        _last_log_second = second
        _last_log_date = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(now))
    return f"{_last_log_date}.{int((now - second) * 1000):03d}"
