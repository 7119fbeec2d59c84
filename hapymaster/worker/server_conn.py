"""A connection to one server (HTTP mode): parses responses, hands them to its client.

While it serves a request it is attached to one client connection
(``proxy_http.HttpClient``), which decides what goes to the client; when the
response ended cleanly it goes back to its server's pool (``pool``). A
Content-Length body past the first read bypasses the parser: it is only
bytes to count and pass on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httptools

from hapymaster.worker.exchange import R_SERVER, WRITE_HIGH, Exchange
from hapymaster.worker.h1 import HOP_BY_HOP, RESPONSE_SPECIAL

if TYPE_CHECKING:
    from hapymaster.worker.balance import ServerState
    from hapymaster.worker.process import Worker
    from hapymaster.worker.proxy_http import HttpClient

HttpParserError = httptools.HttpParserError
HttpParserUpgrade = httptools.HttpParserUpgrade


class HttpServer:
    """A connection to one server; in its pool when idle."""

    def __init__(self, worker: "Worker", server: "ServerState"):
        self.w = worker
        self.server = server
        self.transport: Any = None
        self.client: "HttpClient | None" = None
        self.ex: Exchange | None = None
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

    # --- attached to a client, or idle -----------------------------------------

    def attach(self, client: "HttpClient", ex: Exchange) -> None:
        """Serve ``ex`` for ``client``: a new response starts."""
        self.client = client
        self.ex = ex
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

    def detach(self) -> None:
        self.client = None
        self.ex = None

    def release(self, reusable: bool) -> None:
        """The response ended: back to the server's pool, or closed."""
        self.client = None
        self.ex = None
        server = self.server
        if not reusable or self.closed or not server.usable or self.w.stopping \
                or not server.pool.put(self):
            self.close()
            return
        self.idle = True
        self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # --- reading the response --------------------------------------------------

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
            ex = self.ex
            assert ex is not None
            ex.bytes_out += len(data)
            client.transport.write(data)
            return
        out = client.out = []
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as exc:
            if self.ex is not None and self.ex.status == 101:
                client.start_tunnel(self, data[exc.args[0]:])
            else:
                client.server_error(self, 502)
        except HttpParserError:
            if self.client is not None:
                if self.ex is not None:
                    self.ex.term = "SH"
                self.client.server_error(self, 502)
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

    def _pass_body(self, client: "HttpClient", data: bytes) -> None:
        transport = client.transport
        if transport.is_closing():
            # The client is gone; its connection_lost has not run yet.
            self.transport.abort()
            return
        left = self.body_left
        size = len(data)
        ex = self.ex
        assert ex is not None
        if size < left:
            self.body_left = left - size
            ex.bytes_out += size
            transport.write(data)
            return
        if size > left:
            # More than the response: the server is confused; do not reuse it.
            data = data[:left]
            self.keep_alive = False
        ex.bytes_out += left
        transport.write(data)
        self.raw_body = False
        self.body_left = -1
        self.fresh_parser = True   # the old one stopped in the middle of this body
        client.response_done(self)

    # httptools callbacks

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            lname = name.lower()
            if lname in RESPONSE_SPECIAL:
                self.special.append((lname, value))
                if lname in HOP_BY_HOP:
                    return
            self.fwd += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        client = self.client
        assert client is not None
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
        if client is not None and self.ex is not None:
            client.response_body(self, body)

    def on_message_complete(self) -> None:
        if self.in_head:
            return  # the end of an interim (1xx) response
        self.body_left = -1
        client = self.client
        if client is not None and self.ex is not None and self.ex.status != 101:
            client.response_done(self)

    # --- flow control and the end ----------------------------------------------

    def pause_writing(self) -> None:
        if self.client is not None:
            self.client.pause_reading_for(R_SERVER)

    def resume_writing(self) -> None:
        if self.client is not None:
            self.client.resume_reading_for(R_SERVER)

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
            self.server.pool.remove(self)
            return
        if self.client is not None:
            self.client.server_lost(self, exc)
