"""The HTTP/1.1 reverse proxy: the client connection.

A client connection (``HttpClient``) frames requests itself: it finds where
each head ends, checks the request line (``h1.request_line``), hands the
head alone to httptools for its fields, and takes the body after it as
counted bytes or through ``h1.ChunkedDecoder``. (httptools' llhttp refuses
what RFC 9112 allows, extension methods and chunk extensions with
whitespace, and gives no offsets to stop it at a head's end.) It picks a
backend (routes, then ``default_backend``) and a server per request, borrows
an idle keep-alive connection to that server from its pool (``pool``) or
opens one (``server_conn.HttpServer``), sends the rewritten request head
(``h1``), then streams the body as it arrives; the server connection parses
the response and hands it back here, where ``h1`` decides its framing to the
client. Back-pressure is transport to transport: a full write buffer on one
side pauses reading on the other. Nothing buffers a whole body.

Requests pipelined by the client are parsed as they come but served one at a
time, in order: the client's reading is paused while a request waits behind
another, so at most one read's worth is held. Each request is an
``exchange.Exchange``; what the connection is doing is its ``Phase``, changed
only by ``enter()``.

Timeouts are not timers: each connection records its phase, a deadline and
the time of its last I/O, and the worker's sweeper (``process.Worker``) calls
``expire()`` when a limit is passed.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING, Any, Final

import httptools

from hapymaster.worker.h1 import (BODY_LENGTH, BODY_NONE, BODY_UNTIL_CLOSE, LAST_CHUNK, MAX_HEAD,
                                  MAX_HEADERS, MAX_URL, PARSER_METHODS, STAND_IN, ChunkedDecoder,
                                  authority, chunk, content_length, final_head, forwarding_headers,
                                  host_error, interim_head, partial_head_error, request_head,
                                  request_line, switching_head, transfer_codings)
from hapymaster.worker.balance import NO_SERVER, ServerState
from hapymaster.worker.errors import ERROR_RESPONSES
from hapymaster.worker.exchange import (BODY, CONNECT, DRAIN, HEAD, IDLE, PARKED, QUEUE, R_BAD,
                                        R_PARKED, R_PENDING, R_PIPE, R_SERVER, R_UPGRADE,
                                        TUNNEL, WAIT, WRITE_HIGH, Exchange)
from hapymaster.worker.server_conn import HttpServer

if TYPE_CHECKING:
    from hapymaster.worker.process import FrontendState, Worker


HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade

# Body bytes held for a request whose server connection is not there yet
# (connecting, queued, pipelined): beyond this, stop reading the client.
MAX_PENDING: Final = 262144
# Up to this much of a request body still on its way after the server's
# answer is read and dropped to keep the client connection; more: close.
MAX_DRAIN: Final = 16 << 20


class _ParseStop(Exception):
    """Raised from a parser callback to answer ``code`` and stop reading."""

    def __init__(self, code: int):
        super().__init__(code)
        self.code = code


class HttpClient:
    """The client side of an HTTP frontend connection."""

    # One per client connection, idle ones included: slots instead of a
    # __dict__ take about a kilobyte off each (tracemalloc: 2.2 -> 1.2 KiB).
    __slots__ = ("w", "fe", "transport", "parser", "reqs", "req", "srv", "phase", "deadline",
                 "t_io", "paused", "write_paused", "closed", "tunnel", "peer", "client_key",
                 "connect_task", "t_accept", "out", "forwarding", "raw_body", "bad_code",
                 "head_buf", "head_t0", "method", "chunks", "read_done", "trusted_ip",
                 "good_host", "parsed")

    def __init__(self, worker: "Worker", frontend: "FrontendState"):
        self.w = worker
        self.fe = frontend
        self.transport: Any = None
        # The request parser of the head being parsed, None between heads:
        # see _read_head.
        self.parser: Any = None
        # [0] is served, the rest are pipelined (a list, not a deque: rarely
        # more than one, and an empty deque costs ~700 bytes per connection).
        self.reqs: list[Exchange] = []
        self.req: Exchange | None = None      # the request the parser is filling
        self.srv: HttpServer | None = None    # server connection of reqs[0]
        self.phase = HEAD
        self.deadline = 0.0                   # of phases timed from their start
        self.t_io = 0.0                       # last I/O, for the inactivity phases
        self.paused = 0                       # Pause bits: reading resumes at 0
        self.write_paused = False
        self.closed = False
        self.tunnel = False
        self.peer: tuple[str, int] = ("", 0)
        self.client_key = b""
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
        self.parsed: Exchange | None = None   # head parsed in this feed, dispatched after it
        # The start of a request head not whole yet, and when its first byte
        # came: the proxy finds where each head ends itself, so that the body
        # after it (chunked ones especially) is framed here, not by the parser.
        self.head_buf = b""
        self.head_t0 = 0.0
        self.method = b""        # of the head being parsed, as the client wrote it
        self.chunks: ChunkedDecoder | None = None   # self.req's chunked body, being decoded
        # RFC 9112 9.6: a request that closes the connection (Connection:
        # close, HTTP/1.0 without keep-alive) is the last one read; bytes
        # after it are dropped, not answered 400 after it was forwarded.
        self.read_done = False
        self.trusted_ip: str | None = None   # the peer, when it is a trusted proxy
        # The last Host value found valid: a connection's requests nearly
        # always carry the same one, checked once.
        self.good_host = b""

    # --- the phase ----------------------------------------------------------------

    def enter(self, phase: int, now: float) -> None:
        """The one place the connection changes phase, and arms that phase's timeout."""
        self.phase = phase
        if phase >= BODY:       # BODY, WAIT, TUNNEL, DRAIN: inactivity limits
            self.t_io = now
        elif phase == HEAD:
            self.deadline = now + self.fe.timeout.head
        elif phase == IDLE:
            self.deadline = now + self.fe.timeout.http_keep_alive
        elif phase == QUEUE or phase == CONNECT:
            backend = self.reqs[0].backend
            assert backend is not None      # routed before it queues or connects
            timeout = backend.timeout
            self.deadline = now + (timeout.queue if phase == QUEUE else timeout.connect)

    def expire(self, now: float) -> None:
        """Called by the sweeper on every tick: act on the phase's timeout if it passed."""
        phase = self.phase
        if phase >= BODY:       # BODY, WAIT, TUNNEL, DRAIN: inactivity limits
            idle_for = now - self.t_io
            if phase == WAIT:
                if idle_for >= self._backend_timeout("server"):
                    self._server_timeout()
            elif phase == BODY:
                if idle_for >= self.fe.timeout.client:
                    req = self.reqs[0]
                    req.term = "cD"
                    if req.resp_started:
                        self.abort()
                    else:
                        self._error(req, 408)
            elif phase == TUNNEL:
                if idle_for >= self._backend_timeout("tunnel"):
                    self.close()
            elif idle_for >= self.fe.timeout.client:     # DRAIN
                self.close()
            return
        if phase == PARKED or now < self.deadline:
            return
        if phase == HEAD:
            req = self.reqs[0] if self.reqs else \
                Exchange(self.head_t0 if self.head_buf else self.t_accept)
            req.term = "cR"
            self._error(req, 408)
        elif phase == IDLE:
            self.close()
        elif phase == QUEUE:
            req = self.reqs[0]
            req.term = "sQ"
            self._error(req, 503)
        elif phase == CONNECT:
            if self.connect_task is not None:
                self.connect_task.cancel()
                self.connect_task = None
            self._connect_failed(self.reqs[0], "timeout")

    def _server_timeout(self) -> None:
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

    def _backend_timeout(self, name: str) -> float:
        req = self.reqs[0] if self.reqs else None
        timeouts = req.backend.timeout if req is not None and req.backend is not None \
            else self.fe.timeout
        return getattr(timeouts, name)

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
            self.enter(PARKED, now)
            self.pause_reading_for(R_PARKED)
            return
        self.start()

    def start(self) -> None:
        """Called once the connection holds a maxconn slot."""
        self.enter(HEAD, self.w.clock())
        self.resume_reading_for(R_PARKED)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.phase == QUEUE and self.reqs and self.reqs[0].backend is not None:
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
            srv.detach()
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
        if not self.reqs and not self.head_buf and (self.phase == IDLE or self.phase == HEAD):
            self._idle_until_grace_ends()

    def _idle_until_grace_ends(self) -> None:
        grace = self.w.soft_stop_grace
        if grace <= 0:
            self.close()
            return
        now = self.w.clock()
        if self.phase != IDLE:
            self.enter(IDLE, now)
        self.deadline = min(self.deadline, now + grace)

    # --- flow control ---------------------------------------------------------

    def _send(self, data: bytes) -> None:
        """Write to the client; while a server read is parsed, gather into one write."""
        out = self.out
        if out is None:
            transport = self.transport
            if transport is not None and not transport.is_closing():
                transport.write(data)
        else:
            out.append(data)

    def pause_reading_for(self, reason: int) -> None:
        """Stop reading the client for ``reason`` (a Pause bit)."""
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused |= reason

    def resume_reading_for(self, reason: int) -> None:
        """``reason`` is over; reading resumes when no other is left."""
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
        if self.tunnel:
            req = self.reqs[0]
            req.bytes_in += len(data)
            srv = self.srv
            assert srv is not None
            srv.transport.write(data)
            return
        buf = self.head_buf
        if buf:
            data = buf + data       # a head begun in an earlier read, timed from there
            self.head_buf = b""
        else:
            self.head_t0 = self.t_io
        # Heads and bodies in turn; each step takes what it can and says
        # where it stopped: offsets, not slices (a read may hold thousands of
        # pipelined requests, and slicing off each would copy it over and
        # over), and a loop, not a recursion.
        pos = 0
        size = len(data)
        while pos < size:
            if self.read_done:
                return
            if self.raw_body:
                pos = self._pass_body(data, pos)
            elif self.chunks is not None:
                pos = self._pass_chunks(data, pos)
            else:
                pos = self._read_head(data, pos)

    def _read_head(self, data: bytes, pos: int) -> int:
        """Parse the request head that starts at ``pos``; return where it ends."""
        size = len(data)
        if data[pos] == 13:
            while data.startswith(b"\r\n", pos):
                pos += 2    # RFC 9112 2.2: empty lines before a request line
            if pos == size:
                return size
        end = data.find(b"\r\n\r\n", pos)
        if end < 0:
            rest = data[pos:] if pos else data
            error = partial_head_error(rest)
            if error:
                self._bad_request(error)
                return size
            self.head_buf = rest
            if self.phase == IDLE:
                # A head that comes whole in one read goes from IDLE straight
                # to its server (one phase change less per request); this
                # one is timed by timeout.http_request from its first read.
                self.enter(HEAD, self.head_t0)
            return size
        end += 4
        head = data if end == size and not pos else data[pos:end]
        method = head[:head.find(b" ")]
        if method not in PARSER_METHODS:
            # The parser checks the rest of a line that starts with a method
            # it knows; any other is checked here, and the parser gets a
            # stand-in (h1.PARSER_METHODS).
            method, error = request_line(head[:head.find(b"\r\n")])
            if error:
                self._bad_request(error)
                return size
            head = STAND_IN + head[len(method):]
        self.method = method
        # A parser for this head alone, dropped once it is parsed: the proxy
        # frames bodies itself, so a parser is needed for heads only, and an
        # idle connection holds none (one per connection cost ~0.5 KiB of
        # RSS each, issue 9; making one costs ~0.5 us).
        parser = self.parser = httptools.HttpRequestParser(self)
        try:
            parser.feed_data(head)
        except HttpParserUpgrade:
            parsed = self.parsed
            if parsed is not None:
                self.parsed = None
                self._dispatch_parsed(parsed)
            self._upgrade_requested(data[end:])
            return size
        except _ParseStop as exc:
            self.parsed = None
            self._bad_request(exc.code)
            return size
        except HttpParserError as err:     # not "exc": compiled, a name has one type
            self.parsed = None
            cause = err.__context__
            self._bad_request(cause.code if isinstance(cause, _ParseStop) else 400)
            return size
        finally:
            self.parser = None
        parsed = self.parsed
        if parsed is not None:
            self.parsed = None
            self._dispatch_parsed(parsed)
        req = self.req
        if req is not None and req.headers_done:
            # A body follows: framed here, not by the parser.
            left = content_length(req.headers)
            if left < 0:
                req.body_left = -1
                self.chunks = ChunkedDecoder()
            else:
                req.body_left = left
                self.raw_body = True
        self.head_t0 = self.t_io     # a next head in this read began in it
        return end

    def _pass_body(self, data: bytes, pos: int) -> int:
        """Some of self.req's Content-Length body, from ``pos``; return where it stopped."""
        req = self.req
        assert req is not None
        size = len(data)
        end = min(size, pos + req.body_left)
        try:
            self.on_body(data if end == size and not pos else data[pos:end])
        except _ParseStop as exc:
            self._bad_request(exc.code)
            return size
        if req.body_left == 0:
            self.raw_body = False
            self.on_message_complete()
        return end

    def _pass_chunks(self, data: bytes, pos: int) -> int:
        """Some of self.req's chunked body, from ``pos``; return where it stopped."""
        size = len(data)
        chunks = self.chunks
        assert chunks is not None
        try:
            pieces, end = chunks.feed(data, pos)
            for piece in pieces:
                self.on_body(piece)
        except _ParseStop as exc:
            self._bad_request(exc.code)
            return size
        except ValueError:
            self._bad_request(400)
            return size
        if end < 0:
            return size
        self.chunks = None
        self.on_message_complete()
        return end

    # The parser callbacks run inside data_received, which has just read the
    # clock into t_io: they take the time from there instead of again.

    def on_message_begin(self) -> None:
        req = Exchange(self.head_t0)
        reqs = self.reqs
        reqs.append(req)
        self.req = req
        if len(reqs) > 1:
            self.pause_reading_for(R_PIPE)

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > MAX_URL:
            raise _ParseStop(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        if req.headers_done:
            return  # trailers of a chunked body: not forwarded
        req.headers.append((name, value))
        if len(name) == 4 and name.lower() == b"host":     # counted for h1.host_error
            req.hosts += 1
            req.host = value
        elif len(name) == 17 and name.lower() == b"transfer-encoding":
            codings = transfer_codings(value)
            if codings is None or (req.te_chunked and codings):
                raise _ParseStop(400)   # not codings, or more after chunked (h1.transfer_codings)
            req.te_chunked = codings[-1] == b"chunked"
        req.head_size += len(name) + len(value) + 4
        if req.head_size > MAX_HEAD or len(req.headers) > MAX_HEADERS:
            raise _ParseStop(431)

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        req.headers_done = True
        req.t_head = self.t_io
        req.method = self.method
        req.version = version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            raise _ParseStop(400)   # HTTP/0.9 or 2.0 in a line the parser took
        if req.te_chunked is False:
            raise _ParseStop(400)   # RFC 9112 6.3: a request's final coding must be chunked
        if req.hosts != 1 or req.host != self.good_host:
            if host_error(req.hosts, req.host, version):
                raise _ParseStop(400)
            if req.hosts:
                self.good_host = req.host
        # keep_alive and upgrade default to True and False on the class.
        if not parser.should_keep_alive():
            req.keep_alive = False
        if parser.should_upgrade():
            req.upgrade = True
        limit = self.fe.max_body_size
        if limit:
            for name, value in req.headers:
                if name.lower() == b"content-length" and int(value) > limit:
                    raise _ParseStop(413)
        # Not dispatched from here: llhttp still checks the head after this
        # callback returns (a Transfer-Encoding of "chunked<TAB>" fails then),
        # and a head forwarded before that would be half a request on the
        # server. _read_head dispatches once the parser has taken all of it.
        self.parsed = req

    def _dispatch_parsed(self, req: Exchange) -> None:
        """``req``'s head is whole and valid: send it on if it is first in line."""
        if req is self.reqs[0]:
            self._dispatch(req, self.t_io)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        size = len(body)
        left = req.body_left
        if left == -2:
            left = content_length(req.headers)
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
                conn.transport.writelines(chunk(body))
            else:
                conn.transport.write(body)
        else:
            if req.pending:
                req.pending.append(body)
            else:
                req.pending = [body]
            req.pending_size += size
            if req.pending_size > MAX_PENDING:
                self.pause_reading_for(R_PENDING)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        self.req = None
        req.complete = True
        if not req.keep_alive:
            self.read_done = True
        if self.phase == DRAIN:
            self._next_request()
        elif req.streaming:
            if req.chunked and req.conn is not None:
                req.conn.transport.write(LAST_CHUNK)
            if self.phase == BODY:
                self.enter(WAIT, self.t_io)     # read by data_received just now

    def _upgrade_requested(self, rest: bytes) -> None:
        # httptools stops at the end of an Upgrade (or CONNECT) request head:
        # what follows belongs to the new protocol if the server agrees (101),
        # or is the next request if it does not.
        req = self.reqs[-1] if self.reqs else None
        if req is None:
            self._bad_request(400)
            return
        req.leftover = rest
        self.pause_reading_for(R_UPGRADE)

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
            self.chunks = None
            self.read_done = True
            self.bad_code = code
            self.pause_reading_for(R_BAD)
            return
        req = reqs[0] if reqs else Exchange(self.w.clock())
        req.term = "PR"
        self._error(req, code)

    # --- choosing the server --------------------------------------------------

    def _dispatch(self, req: Exchange, now: float) -> None:
        """reqs[0] has its head: route it and find it a server connection."""
        fe = self.fe
        req.backend = fe.route(req) if fe.routes else fe.default_backend
        if req.upgrade:
            self.pause_reading_for(R_UPGRADE)
        self._take_server(req, now)

    def _take_server(self, req: Exchange, now: float) -> None:
        backend = req.backend
        assert backend is not None          # routed by _dispatch
        server = backend.take(self, self.client_key)
        if server is None:
            self.enter(QUEUE, now)
            return
        if server is NO_SERVER:
            req.term = "SC"
            self._error(req, 503)
            return
        self._use_server(req, server, now)

    def on_server(self, server: ServerState | None) -> None:
        """The backend queue gave us a server (or None: every server left)."""
        if not self.reqs or self.closed:
            if server is not None:
                server.backend.release(server)
            return
        req = self.reqs[0]
        now = req.t_queue = self.w.clock()
        if server is None:
            req.term = "SQ"
            self._error(req, 503)
            return
        self._use_server(req, server, now)

    def _use_server(self, req: Exchange, server: ServerState, now: float) -> None:
        req.server = server
        if req.t_queue < 0:
            req.t_queue = now
        conn = server.pool.take()
        if conn is not None:
            conn.reused = True
            req.t_connect = now
            self._attach(req, conn, now)
            return
        self._connect(req, server)

    def _connect(self, req: Exchange, server: ServerState) -> None:
        self.enter(CONNECT, self.w.clock())
        worker = self.w
        self.connect_task = worker.open_connection(
            lambda: HttpServer(worker, server), server.host, server.port,
            lambda conn, exc: self._opened(req, conn, exc))

    def _opened(self, req: Exchange, conn: HttpServer | None, exc: OSError | None) -> None:
        self.connect_task = None
        if conn is None:
            assert exc is not None
            self._connect_failed(req, f"{type(exc).__name__}: {exc.strerror or exc}")
            return
        if self.closed or not self.reqs or self.reqs[0] is not req:
            conn.close()
            return
        now = req.t_connect = self.w.clock()
        self._attach(req, conn, now)

    def _connect_failed(self, req: Exchange, why: str) -> None:
        server, backend = req.server, req.backend
        assert server is not None and backend is not None   # it was connecting to server
        server.counters.econ += 1
        backend.counters.econ += 1
        self._release_server(req)
        if req.retries < 3 and not self.closed:
            # Like HAProxy's "retries 3" with "option redispatch": try again,
            # letting the algorithm pick (the failed server is not excluded,
            # but round robin and friends move on).
            req.retries += 1
            server.counters.wretr += 1
            self._take_server(req, self.w.clock())
            return
        req.term = "SC"
        self._error(req, 503)

    def _attach(self, req: Exchange, conn: HttpServer, now: float) -> None:
        """Send the request head (and any held body) on ``conn``."""
        self.srv = conn
        req.conn = conn
        conn.attach(self, req)
        if self.write_paused:
            conn.transport.pause_reading()
        forwarding = self.forwarding
        if forwarding is None:
            ip = self.peer[0]
            fe = self.fe
            forwarding = self.forwarding = forwarding_headers(
                ip, fe.x_forwarded_for, fe.x_forwarded_proto, fe.forwarded)
            if fe.trusted_proxies and trusted(ip, fe.trusted_proxies):
                self.trusted_ip = ip
        # The request goes on as HTTP/1.1, which needs a Host: an HTTP/1.0
        # one without gets the server's address (as HAProxy's checks send),
        # else nginx answers 400. An absolute-form target's authority
        # replaces the client's Host (RFC 9112 3.2.2).
        url = req.url
        target_host = authority(url) if url[:1] != b"/" else b""
        server = req.server
        assert server is not None           # attached: it holds a slot
        default_host = b"" if req.version == "1.1" else server.address.encode()
        head, req.host, chunked, has_body = request_head(
            req.method, url, req.headers, req.upgrade, forwarding, self.fe.request_skip,
            self.trusted_ip, default_host, target_host)
        if chunked:
            req.chunked = True
        if has_body:
            req.has_body = True
        req.bytes_in += len(head)
        transport = conn.transport
        if req.pending:
            if chunked:
                parts = [head]
                for data in req.pending:
                    parts += chunk(data)
                if req.complete:
                    parts.append(LAST_CHUNK)
                transport.writelines(parts)
            else:
                transport.writelines([head, *req.pending])
            req.pending = None
            req.pending_size = 0
            self.resume_reading_for(R_PENDING)
        else:
            if req.complete and chunked:
                head += LAST_CHUNK
            transport.write(head)
        req.streaming = True
        # A request without a body is as good as whole: its end is parsed
        # in the same read as its head.
        self.enter(WAIT if req.complete or not has_body else BODY, now)

    # --- the response ---------------------------------------------------------

    def response_head(self, conn: HttpServer, status: int) -> None:
        req = conn.ex
        assert req is not None
        if status < 200 and status != 101:
            # Interim responses (100 Continue, 103) go to HTTP/1.1 clients only.
            if req.version == "1.1":
                self._send(interim_head(status, conn.reason))
            return
        req.t_response = self.t_io   # set by HttpServer.data_received, which parses this head
        req.status = status
        req.resp_started = True
        if status == 101:
            if not req.upgrade:
                req.term = "SH"
                self.server_error(conn, 502)
                return
            head = switching_head(conn.reason, conn.fwd, conn.special)
            req.bytes_out += len(head)
            self._send(head)
            return
        head, body, length, req.resp_chunked, req.client_ka = final_head(
            status, conn.reason, conn.fwd, conn.special, req.method, req.version,
            req.keep_alive and req.client_ka and not self.w.stopping)
        if body == BODY_LENGTH:
            conn.body_left = length
        elif body == BODY_UNTIL_CLOSE:
            req.resp_close = True
        req.bytes_out += len(head)
        self._send(head)
        if body == BODY_NONE and req.method == b"HEAD":
            # httptools cannot be told that a HEAD response has no body: end
            # the exchange here and give the connection a fresh parser.
            conn.fresh_parser = True
            self.response_done(conn)

    def response_body(self, conn: HttpServer, body: bytes) -> None:
        req = conn.ex
        assert req is not None
        req.bytes_out += len(body)
        out = self.out
        if out is None:
            if req.resp_chunked:
                self.transport.writelines(chunk(body))
            else:
                self.transport.write(body)
        elif req.resp_chunked:
            out += chunk(body)
        else:
            out.append(body)

    def response_done(self, conn: HttpServer) -> None:
        """The server finished its response: log, recycle, serve the next request."""
        req = conn.ex
        if req is None or req.status == 0:
            return
        if req.resp_chunked:
            self._send(LAST_CHUNK)
        self.srv = None
        self._release_server(req)
        conn.release(conn.keep_alive and req.complete and not req.resp_close)
        self._finish_log(req)
        del self.reqs[0]
        if not req.client_ka:
            self.close()
            return
        if not req.complete:
            self._drain(req)
            return
        if req.upgrade:
            # An Upgrade the server declined: what followed its head is the
            # next requests.
            self.resume_reading_for(R_UPGRADE)
            leftover, req.leftover = req.leftover, b""
            self.enter(IDLE, self.w.clock())
            if leftover:
                self.data_received(leftover)
            return
        self._next_request()

    def _drain(self, req: Exchange) -> None:
        """The server answered before the request body ended (RFC 9112 9.3 allows
        it): read the rest and drop it, so that the client, still sending,
        is not cut off and keeps its connection, as with HAProxy."""
        if req.body_left == -2:     # answered before a byte of the body came
            req.body_left = content_length(req.headers)
        if not 0 < req.body_left <= MAX_DRAIN or req.upgrade:
            self.close()
            return
        req.conn = None     # with streaming set: on_body drops what comes
        self.enter(DRAIN, self.w.clock())
        self.resume_reading_for(R_PENDING | R_SERVER)

    def _next_request(self) -> None:
        """The connection is free: serve a pipelined request or wait for one."""
        if self.reqs:
            nxt = self.reqs[0]
            if nxt.headers_done:
                self.w.loop.call_soon(self._dispatch_next, nxt)
            else:
                self.enter(HEAD, self.w.clock())
            if len(self.reqs) == 1:
                self.resume_reading_for(R_PIPE)
        elif self.head_buf:
            # The start of the next head came while this one was served.
            self.enter(HEAD, self.head_t0)
            self.resume_reading_for(R_PIPE)
        elif self.bad_code:
            req = Exchange(self.w.clock())
            req.term = "PR"
            self._error(req, self.bad_code)
        else:
            # t_io: read when the end of the response was, just now.
            self.enter(IDLE, self.t_io)
            if self.paused:
                self.resume_reading_for(R_PIPE)
            if self.w.stopping:
                # Its response went out with keep-alive just before the
                # soft stop: the client may already be sending the next one.
                self._idle_until_grace_ends()

    def _dispatch_next(self, req: Exchange) -> None:
        if not self.closed and self.reqs and self.reqs[0] is req and not req.resp_started:
            self._dispatch(req, self.w.clock())     # a loop pass later: read the clock

    def start_tunnel(self, conn: HttpServer, rest: bytes) -> None:
        """The server answered 101: from now on bytes flow unparsed both ways."""
        req = conn.ex
        assert req is not None
        self.tunnel = True
        conn.tunnel = True
        self.enter(TUNNEL, self.w.clock())
        if rest:
            req.bytes_out += len(rest)
            self._send(rest)
        if req.leftover:
            req.bytes_in += len(req.leftover)
            conn.transport.write(req.leftover)
            req.leftover = b""
        self.resume_reading_for(R_UPGRADE)
        self.resume_reading_for(R_PIPE)

    def server_lost(self, conn: HttpServer, exc: Exception | None) -> None:
        """The server connection closed while serving reqs[0]."""
        req = conn.ex
        conn.detach()
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
                # The end of a body delimited by the server closing.
                conn.ex = req
                conn.keep_alive = False
                self.response_done(conn)
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
            assert req.server is not None   # attached until _release_server below
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
            assert req.server is not None
            self._connect(req, req.server)
            return
        req.term = "SH"
        self.server_error(conn, 502)

    def server_error(self, conn: HttpServer, code: int) -> None:
        """The server's answer is invalid (or it failed before one): ``code``, or a cut."""
        req = conn.ex or (self.reqs[0] if self.reqs else None)
        if req is None:
            self.close()
            return
        if req.server is not None:
            req.server.counters.eresp += 1
        if req.backend is not None:
            req.backend.counters.eresp += 1
        conn.detach()
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

    def _release_server(self, req: Exchange) -> None:
        server = req.server
        if server is not None:
            req.server = None
            server.backend.release(server)
            req.server_last = server

    def _error(self, req: Exchange, code: int) -> None:
        """Answer ``code`` with the small HAProxy-like page and close."""
        if self.phase == QUEUE and req.backend is not None:
            req.backend.dequeue(self)
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._release_server(req)
        srv, self.srv = self.srv, None
        if srv is not None:
            srv.detach()
            srv.close()
        req.status = code
        self.read_done = True       # what follows in this read is not parsed either
        body = ERROR_RESPONSES[code]
        req.bytes_out += len(body)
        self._send(body)
        if req.headers_done or code in (400, 408, 414, 431):
            self._finish_log(req)
        self.reqs.clear()
        self.close()

    def _finish_log(self, req: Exchange, aborted: bool = False) -> None:
        """``req`` is over (answered, failed or abandoned): count it, log it."""
        fe = self.fe
        req.account(fe.counters, aborted)
        if fe.access_log:
            self.log_exchange(req, req.server_last)

    def log_exchange(self, req: Exchange, server: ServerState | None) -> None:
        """Hand ``req``'s values to the access log (HAProxy's httplog, with journald fields).

        Only the values are queued here; the line is built and written by
        ``accesslog`` once per loop iteration, off the request path.
        """
        backend = req.backend
        w = self.w
        fe = self.fe
        peer = self.peer
        if backend is not None:
            w.access_log.http(
                fe.name, peer[0], peer[1], backend.name,
                server.name if server is not None else "<NOSRV>", req.t_start, req.t_head,
                req.t_queue, req.t_connect, req.t_response, w.clock(), req.status,
                req.bytes_out, req.term, w.cur_conns, fe.cur, backend.cur,
                server.cur if server is not None else 0, req.retries, len(backend.queue),
                req.method, req.url, req.version)
        else:
            w.access_log.http(
                fe.name, peer[0], peer[1], fe.name, "<NOSRV>", req.t_start, req.t_head,
                req.t_queue, req.t_connect, req.t_response, w.clock(), req.status,
                req.bytes_out, req.term, w.cur_conns, fe.cur, 0, 0, req.retries, 0,
                req.method, req.url, req.version)


def trusted(ip: str, networks: tuple) -> bool:
    """Whether the peer ``ip`` is in one of ``networks`` (``trusted_proxies``)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:      # no peer address (a unix socket): nothing to trust
        return False
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped     # a dual-stack listener's IPv4 peer
    return any(address in net for net in networks)


def http_client_factory(worker: "Worker", frontend: "FrontendState") -> HttpClient:
    """The protocol of one client connection on an HTTP frontend."""
    return HttpClient(worker, frontend)
