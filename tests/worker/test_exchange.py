"""The HTTP client and server connections in process, through fake transports:
bytes in, bytes and calls out, the phase after each step."""

from __future__ import annotations

import asyncio

import pytest

from fake_transport import FakeTransport, connect, inprocess_worker
from hapymaster.worker.accesslog import AccessLog, Sink
from hapymaster.worker import exchange
from hapymaster.worker.exchange import Pause, Phase
from hapymaster.worker.proxy_http import HttpClient
from hapymaster.worker.server_conn import HttpServer

CONFIG = """\
global:
  soft_stop_grace: 2s
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

GET = b"GET /a HTTP/1.1\r\nHost: h\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingSink(Sink):
    """Keeps (termination state, status) of each record the worker's access log writes."""

    name = "recording"

    def __init__(self) -> None:
        self.logged: list[tuple[str, int]] = []

    def render(self, records, lines, wall):
        # An http() record: status at index 11, termination state at 13.
        self.logged += [(record[13], record[11]) for record in records]

    def send(self, rendered):
        return 0, None


class Proxy:
    """One client connection and one pooled server connection of an in-process worker."""

    def __init__(self, config: str = CONFIG):
        self.worker = inprocess_worker(config)
        self.server = self.worker.backends["app"].servers[0]
        self.conn = HttpServer(self.worker, self.server)
        self.server_side = connect(self.conn, FakeTransport(("127.0.0.1", 9)))
        self.conn.release(True)
        self.sink = RecordingSink()
        self.worker.access_log = AccessLog(self.worker.loop, self.sink)
        self.client = HttpClient(self.worker, self.worker.frontends[0])
        self.client_side = connect(self.client, FakeTransport())

    @property
    def logged(self) -> list[tuple[str, int]]:
        """What was logged so far (written now, not at the end of the loop iteration)."""
        self.worker.access_log.flush()
        return self.sink.logged

    def run_callbacks(self) -> None:
        self.worker.loop.run_until_complete(asyncio.sleep(0))

    def counters(self, row: str) -> object:
        return self.server.counters if row == "server" else self.server.backend.counters

    def close(self) -> None:
        self.worker.loop.close()


@pytest.fixture
def proxy():
    made = []

    def make(config: str = CONFIG) -> Proxy:
        made.append(Proxy(config))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_the_int_constants_are_the_enums_values():
    # The hot path compares plain ints (inlined when compiled); the enums name them.
    for phase in Phase:
        assert getattr(exchange, phase.name) == phase.value
    for reason in Pause:
        assert getattr(exchange, "R_" + reason.name) == reason.value
    assert len(Phase) == 9 and len(Pause) == 6


def test_keep_alive_request_through_the_pool(proxy):
    p = proxy()
    assert p.client.phase == Phase.HEAD
    p.client.data_received(GET)
    sent = p.server_side.take()
    assert sent.startswith(b"GET /a HTTP/1.1\r\nHost: h\r\n")
    assert b"X-Forwarded-For: 127.0.0.1\r\n" in sent and sent.endswith(b"\r\n\r\n")
    assert p.client.phase == Phase.WAIT and len(p.server.pool) == 0
    p.conn.data_received(OK)
    assert p.client_side.take() == OK
    assert p.client.phase == Phase.IDLE and len(p.server.pool) == 1
    assert p.logged == [("--", 200)] and not p.client_side.closing
    assert p.server.cur == 0 and p.counters("server").hrsp_2xx == 1


def test_pipelined_requests_wait_their_turn(proxy):
    p = proxy()
    p.client.data_received(GET + GET.replace(b"/a", b"/b"))
    assert "pause_reading" in p.client_side.calls     # the second waits
    assert p.server_side.take().startswith(b"GET /a ")
    p.conn.data_received(OK)
    p.run_callbacks()
    assert p.server_side.take().startswith(b"GET /b ")
    p.conn.data_received(OK)
    assert p.client_side.take() == OK + OK
    assert p.client_side.reading and p.client.phase == Phase.IDLE


def test_invalid_request_pipelined_during_a_streaming_body(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
    p.client.data_received(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
    assert p.client_side.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234"
    assert not p.client_side.reading and not p.client_side.closing
    p.conn.data_received(b"56789")
    out = p.client_side.take()
    assert out.startswith(b"56789HTTP/1.1 400 Bad request\r\n")
    assert p.client_side.closing and p.logged == [("--", 200), ("PR", 400)]


def test_client_leaving_mid_download_is_a_client_abort(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 1000)
    p.client_side.lost(ConnectionResetError())
    assert p.logged == [("CD", 200)]
    for row in ("server", "backend"):
        assert p.counters(row).cli_abrt == 1 and p.counters(row).srv_abrt == 0
    assert p.server_side.closing and p.server.cur == 0


def test_soft_stop_keeps_an_idle_connection_for_the_grace(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(OK)
    p.client_side.take()
    now = p.worker.clock()
    p.worker.soft_stop()
    assert not p.client_side.closing and len(p.server.pool) == 0   # pooled one closed
    assert p.server_side.closing
    p.client.expire(now + 1.5)
    assert not p.client_side.closing
    p.client.expire(now + 2.5)
    assert p.client_side.closing


def test_soft_stop_answers_the_next_request_with_close(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(OK)
    p.client_side.take()
    # The client's side of Worker.soft_stop only: the pooled server
    # connection stays, so that the next request can be served in process.
    p.worker.stopping = True
    p.client.soft_stop()
    assert p.client.phase == Phase.IDLE and not p.client_side.closing
    p.client.data_received(GET)
    assert p.server_side.take().startswith(b"GET /a ")
    p.conn.data_received(OK)
    out = p.client_side.take()
    assert out == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
    assert p.client_side.closing
    assert len(p.server.pool) == 0 and p.server_side.closing    # not pooled while stopping


def test_a_response_that_went_out_keep_alive_just_before_the_stop(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    p.worker.soft_stop()          # the head already said keep-alive
    p.conn.data_received(b"cd")
    assert not p.client_side.closing and p.client.phase == Phase.IDLE
    assert p.client.deadline <= p.worker.clock() + 2.0


def test_interim_response_relayed_to_http11_only(proxy):
    p = proxy()
    p.client.data_received(b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
                           b"Expect: 100-continue\r\n\r\n")
    assert p.client.phase == Phase.BODY
    p.conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert p.client_side.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
    p.client.data_received(b"hi")
    assert p.server_side.take().endswith(b"\r\n\r\nhi")
    assert p.client.phase == Phase.WAIT
    p.conn.data_received(OK)
    assert p.client_side.take() == OK


def test_http10_client_body_until_server_close(proxy):
    p = proxy()
    p.client.data_received(b"GET /old HTTP/1.0\r\n\r\n")
    p.conn.data_received(b"HTTP/1.1 200 OK\r\n\r\nall of it")
    p.server_side.lost()
    out = p.client_side.take()
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
    assert p.client_side.closing and p.logged == [("--", 200)]


def test_a_head_in_two_reads_is_timed_by_http_request(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(OK)
    p.client_side.take()
    assert p.client.phase == Phase.IDLE
    p.client.data_received(b"GET /slow HTTP/1.1\r\nHo")
    assert p.client.phase == Phase.HEAD
    # No exchange yet: it is made when the head is whole; the head's first read is kept.
    started = p.client.head_t0
    p.client.expire(started + 4.9)       # timeout.http_request is 5s in CONFIG
    assert not p.client_side.closing
    p.client.expire(started + 5.1)
    assert p.client_side.take().startswith(b"HTTP/1.1 408 ")
    assert p.client_side.closing and p.logged[-1] == ("cR", 408)


def test_a_head_in_one_read_goes_straight_to_its_server(proxy):
    p = proxy()
    p.client.data_received(GET)
    p.conn.data_received(OK)
    p.client.data_received(b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nab")
    assert p.client.phase == Phase.BODY       # never HEAD: the head came whole
    p.client.data_received(b"cd")
    assert p.client.phase == Phase.WAIT
    assert p.server_side.take().endswith(b"\r\n\r\nabcd")


def test_a_chunked_body_byte_by_byte_then_a_pipelined_request(proxy):
    # The proxy decodes the chunked layer itself (extensions with BWS, which
    # the parser refuses; trailers dropped), whatever the reads' boundaries.
    p = proxy()
    request = (b"POST /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5 ;x=y\r\nhello\r\n0\r\nT: 1\r\n\r\n" + GET)
    for i in range(len(request)):
        p.client.data_received(request[i:i + 1])
    sent = p.server_side.take()
    head, _, body = sent.partition(b"\r\n\r\n")
    assert head.startswith(b"POST /c HTTP/1.1\r\n") and b"Transfer-Encoding: chunked" in head
    assert body == b"".join(b"1\r\n%c\r\n" % c for c in b"hello") + b"0\r\n\r\n"
    assert len(p.client.reqs) == 2 and not p.client_side.reading
    p.conn.data_received(OK)
    p.run_callbacks()
    assert p.server_side.take().startswith(b"GET /a ")


def test_nothing_is_read_after_a_closing_request(proxy):
    p = proxy()
    p.client.data_received(b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
                           b"GET /b HTTP/1.1\r\n\r\n")
    p.client.data_received(b"\x00 not http")
    assert p.server_side.take().startswith(b"GET /a ")
    p.conn.data_received(OK)
    assert p.client_side.take() == (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                    b"Connection: close\r\n\r\nok")
    assert p.client_side.closing and p.logged == [("--", 200)]
    assert p.worker.frontends[0].counters.ereq == 0


def test_thousands_of_pipelined_bodies_in_one_read(proxy):
    # Heads and bodies are taken in a loop, not by recursion.
    p = proxy()
    post = b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\n\r\nx"
    p.client.data_received(post * 3000)
    assert len(p.client.reqs) == 3000 and all(r.complete for r in p.client.reqs)


def test_a_head_begun_while_the_previous_request_is_served(proxy):
    # Its start is held by the connection (no exchange yet); once the answer
    # before it is out, the connection waits for the rest of it in HEAD
    # (a 408 at timeout.http_request), not IDLE (a silent close).
    p = proxy()
    p.client.data_received(GET + b"GET /b HTTP/1.1\r\nHo")
    assert p.server_side.take().startswith(b"GET /a ")
    p.conn.data_received(OK)
    assert p.client_side.take() == OK
    assert p.client.phase == Phase.HEAD
    p.client.data_received(b"st: h\r\n\r\n")
    p.run_callbacks()
    assert p.server_side.take().startswith(b"GET /b HTTP/1.1\r\nHost: h\r\n")


def test_a_connection_holds_no_parser_between_heads(proxy):
    # A request parser is made for each head and dropped once it is parsed
    # (~0.5 KiB of llhttp state that an idle connection would hold).
    p = proxy()
    p.client.data_received(GET)
    assert p.client.parser is None
    assert p.server_side.take().startswith(b"GET /a HTTP/1.1\r\n")
    p.conn.data_received(OK)
    assert p.client_side.take() == OK and p.client.phase == Phase.IDLE
    p.client.data_received(b"GET /b HTTP/1.1\r\nHo")     # half a head: bytes kept, no parser
    assert p.client.parser is None and p.client.phase == Phase.HEAD
    p.client.data_received(b"st: h\r\n\r\n")
    assert p.client.parser is None
    assert p.server_side.take().startswith(b"GET /b HTTP/1.1\r\n")
    p.conn.data_received(OK)
    assert p.client_side.take() == OK and p.logged == [("--", 200), ("--", 200)]
