"""Fuzzing the request path in process: parse -> rewrite -> forward.

A client connection of a real Worker (never-run event loop, fake transports)
with one pooled server connection is fed request bytes, cut at random
places: valid pipelines from a seed corpus, then the same with bytes deleted,
duplicated, replaced or with hostile fragments inserted (framing headers,
bare CR/LF, chunk sizes). Whatever the bytes:

- no exception escapes the protocol (in the worker it would drop the
  connection without an answer, and a bug could hide behind it);
- what reaches the server parses, with a strict parser, as a sequence of
  complete, well-framed requests: nothing smuggled, nothing half-forwarded
  that the server could read as two requests;
- what the client gets parses as well-formed responses, and after an error
  answer (4xx/5xx) the connection is closed and nothing more is forwarded.

CI runs a bounded number of examples (seconds); set HAPYMASTER_FUZZ_EXAMPLES
for a longer run by hand (README, Reliability).
"""

from __future__ import annotations

import asyncio
import os

import httptools
from hypothesis import HealthCheck, given, settings, strategies as st

from fake_transport import FakeTransport, connect, inprocess_worker
from hapymaster.worker.proxy_http import HttpClient
from hapymaster.worker.server_conn import HttpServer

CONFIG = """\
defaults:
  mode: http
  timeout: {http_keep_alive: 10s, http_request: 5s}
frontends:
  - {name: web, bind: ["127.0.0.1:18080"], default_backend: app}
backends:
  - name: app
    servers:
      - {name: s1, address: "127.0.0.1:9"}
"""
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /a?b=c HTTP/1.1\r\nHost: a\r\nUser-Agent: x\r\nAccept: */*\r\n\r\n"
    b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n",
    b"GET /old HTTP/1.0\r\n\r\n",
    b"GET /close HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGET /never HTTP/1.1\r\n\r\n",
    b"PUT /k HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n",
]
FRAGMENTS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff",
             b"Content-Length: 5\r\n", b"Content-Length: -1\r\n", b"Content-Length: 99999999999\r\n",
             b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip, chunked\r\n",
             b"Transfer-Encoding: identity\r\n", b"Host: b\r\n", b"Connection: close\r\n",
             b"Connection: keep-alive, Upgrade\r\n", b"Expect: 100-continue\r\n",
             b"0\r\n\r\n", b"ffffffffffffffff\r\n", b"5 ;a=b\r\n", b"GET / HTTP/1.1\r\n",
             b"HTTP/1.1", b"POST", b" HTTP/0.9", b"\r\n\r\n"]
EXAMPLES = int(os.environ.get("HAPYMASTER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
    "HAPYMASTER_FUZZ_EXAMPLES"), suppress_health_check=[HealthCheck.too_slow])


TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class StrictResponses:
    """The client's side: a byte stream that llhttp (strict) must read as responses."""

    def __init__(self) -> None:
        self.messages = 0
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.messages += 1
        self.statuses.append(self.parser.get_status_code())

    def feed(self, data: bytes) -> None:
        if data:
            self.parser.feed_data(data)


class _Head:
    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.complete = True


class StrictRequests:
    """The server's side: complete, unambiguously framed requests, one after the other.

    llhttp checks each head (with GET in place of the method: it knows only a
    fixed list, and any RFC 9110 token is a method); the framing is checked
    here: one Content-Length, or a Transfer-Encoding ending in chunked with a
    well-formed chunked body, never both. Anything else raises.
    """

    def __init__(self) -> None:
        self.messages = 0
        self.buf = b""

    def feed(self, data: bytes) -> None:
        self.buf += data
        while self.buf:
            used = self._one(self.buf)
            if used == 0:
                return
            self.buf = self.buf[used:]
            self.messages += 1

    def _one(self, buf: bytes) -> int:
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return 0
        head = buf[:end + 4]
        method, target, version = head[:head.index(b"\r\n")].split(b" ")
        assert method and not method.translate(None, bytes(TOKEN)), head
        assert target and version in (b"HTTP/1.0", b"HTTP/1.1"), head
        fields = _Head()
        parser = httptools.HttpRequestParser(fields)
        try:
            parser.feed_data(b"GET" + head[len(method):])
        except httptools.HttpParserUpgrade:
            pass
        assert fields.complete, head
        lengths = {v.strip() for n, v in fields.fields if n == b"content-length"}
        codings = [c.strip().lower() for n, v in fields.fields if n == b"transfer-encoding"
                   for c in v.split(b",")]
        assert not (lengths and codings), head
        pos = end + 4
        if codings:
            assert codings[-1] == b"chunked", head
            while True:
                line_end = buf.find(b"\r\n", pos)
                if line_end < 0:
                    return 0
                size_text = buf[pos:line_end].split(b";")[0]
                size = int(size_text, 16)   # raises on anything but hex digits
                assert size_text == size_text.strip() and size >= 0, buf[pos:line_end]
                pos = line_end + 2
                if size == 0:
                    if not buf.startswith(b"\r\n", pos):
                        return 0 if len(buf) < pos + 2 else _fail(buf[pos:pos + 20])
                    return pos + 2
                if len(buf) < pos + size + 2:
                    return 0
                assert buf[pos + size:pos + size + 2] == b"\r\n", buf[pos:pos + size + 2]
                pos += size + 2
        assert len(lengths) <= 1 and all(v.isdigit() for v in lengths), head
        length = int(next(iter(lengths))) if lengths else 0
        return pos + length if len(buf) >= pos + length else 0


def _fail(what: bytes) -> int:
    raise AssertionError(f"malformed chunked body end: {what!r}")


def run(data: bytes, cuts: list[int]) -> None:
    worker = inprocess_worker(CONFIG)
    try:
        server = worker.backends["app"].servers[0]
        conn = HttpServer(worker, server)
        server_side = connect(conn, FakeTransport(("127.0.0.1", 9)))
        conn.release(True)
        client = HttpClient(worker, worker.frontends[0])
        client_side = connect(client, FakeTransport())
        to_server = StrictRequests()
        to_client = StrictResponses()
        answered = 0
        pieces, start = [], 0
        for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
            pieces.append(data[start:cut])
            start = cut
        for piece in pieces:
            if client_side.closing:
                break
            if piece:
                client.data_received(piece)
            for _ in range(3):   # let queued callbacks (next pipelined request) run
                worker.loop.run_until_complete(asyncio.sleep(0))
                to_server.feed(server_side.take())
                while answered < to_server.messages and not server_side.closing:
                    answered += 1
                    conn.data_received(OK)
            out = client_side.take()
            to_client.feed(out)
            if any(code >= 400 for code in to_client.statuses):
                # An error answer ends the connection, and nothing more goes out.
                assert client_side.closing, "an error answer left the connection open"
                forwarded = to_server.messages
                for rest in pieces[pieces.index(piece) + 1:]:
                    if rest and not client_side.closing:
                        client.data_received(rest)
                to_server.feed(server_side.take())
                assert to_server.messages == forwarded, "forwarded after an error answer"
                break
        assert to_client.messages <= to_server.messages + 1
    finally:
        worker.loop.close()


@FUZZ
@given(st.sampled_from(SEEDS), st.lists(st.integers(0, 10_000), max_size=6))
def test_seed_requests_cut_anywhere(data: bytes, cuts: list[int]) -> None:
    run(data, cuts)


@st.composite
def mutated(draw) -> bytes:
    data = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["delete", "duplicate", "replace", "insert"]))
        span = draw(st.integers(1, 8))
        if action == "delete":
            data = data[:at] + data[at + span:]
        elif action == "duplicate":
            data = data[:at] + data[at:at + span] * 2 + data[at + span:]
        elif action == "replace":
            data = data[:at] + draw(st.binary(min_size=1, max_size=span)) + data[at + span:]
        else:
            data = data[:at] + draw(st.sampled_from(FRAGMENTS)) + data[at:]
    return data


@FUZZ
@given(mutated(), st.lists(st.integers(0, 10_000), max_size=6))
def test_mutated_requests_never_crash_or_smuggle(data: bytes, cuts: list[int]) -> None:
    run(data, cuts)
