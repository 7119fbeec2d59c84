"""What a client connection is doing, and one request/response exchange on it.

``Phase`` is the state of a client connection (HTTP and TCP alike) as the
sweeper sees it: each phase has one timeout, measured either from the
moment the phase was entered (``deadline``) or from the last I/O (an
inactivity limit). A connection changes phase only through its ``enter()``
method, so the transitions below are the whole story:

HTTP (``proxy_http.HttpClient``)::

    PARKED --maxconn slot free--> HEAD
    HEAD, IDLE --head parsed--> QUEUE (every server full)
                              | CONNECT (no idle pooled connection)
                              | BODY, WAIT (request sent on a pooled one; body to come / whole)
    QUEUE --slot free--> CONNECT | BODY | WAIT
    CONNECT --connected--> BODY | WAIT;   CONNECT --refused/timeout--> retried as above
    BODY --body ended--> WAIT
    WAIT --response ended--> IDLE (keep-alive) | HEAD (a pipelined head not whole yet)
                           | as "head parsed" (a pipelined request, next loop pass) | closed
    WAIT --answered before the body ended--> DRAIN --body ended--> IDLE
    WAIT --101--> TUNNEL
    IDLE --a read ending inside a head--> HEAD (a head whole in one read skips it)

TCP (``proxy_tcp.TcpClient``)::

    PARKED --slot free--> QUEUE or CONNECT --connected--> TUNNEL

``Pause`` holds the reasons why a client's reading is paused: reading
resumes when none is left (uvicorn's ``FlowControl`` idea, as bit flags).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from hapymaster.worker.balance import BackendState, Counters, ServerState
    from hapymaster.worker.server_conn import HttpServer

# Write buffer limit of every proxied transport: beyond it the other side's
# reading is paused (pause_writing). One value for HTTP and TCP.
WRITE_HIGH: Final = 262144


# The phases and pause reasons as plain int constants, for the hot path: it
# compares them several times per request. Final literals are inlined by
# mypyc in every module that imports them; interpreted, a module global
# costs ~20 ns where an Enum attribute costs ~90, and comparing enum members
# misses the int fast path. The enums below give them their names
# (``Phase(client.phase)``); tests/worker/test_exchange.py checks they agree.
PARKED: Final = 0
HEAD: Final = 1
IDLE: Final = 2
QUEUE: Final = 3
CONNECT: Final = 4
BODY: Final = 5
WAIT: Final = 6
TUNNEL: Final = 7
DRAIN: Final = 8
R_PIPE: Final = 1
R_PENDING: Final = 2
R_SERVER: Final = 4
R_PARKED: Final = 8
R_UPGRADE: Final = 16
R_BAD: Final = 32


class Phase(enum.IntEnum):
    # Numbered so that the phases timed from the last I/O (an inactivity
    # limit) come last: ``phase >= BODY``.
    PARKED = 0     # accepted beyond maxconn, waiting for a slot: no timeout
    HEAD = 1       # waiting for a complete request head: timeout.http_request (else client) -> 408
    IDLE = 2       # keep-alive, between requests: timeout.http_keep_alive -> close
    QUEUE = 3      # waiting for a server slot: timeout.queue -> 503 (tcp: close)
    CONNECT = 4    # connecting to the server: timeout.connect -> retry, then 503
    BODY = 5       # request body still arriving: timeout.client (inactivity) -> 408
    WAIT = 6       # request sent, response expected/streaming: timeout.server (inactivity) -> 504
    TUNNEL = 7     # bytes relayed both ways (Upgrade, tcp mode): inactivity -> close
    DRAIN = 8      # answered before its body ended: dropping the rest; timeout.client -> close


class Pause(enum.IntFlag):
    PIPE = 1       # a pipelined request waits behind the current one
    PENDING = 2    # body held while the server connection is not ready
    SERVER = 4     # the server connection's write buffer is full
    PARKED = 8     # accepted beyond maxconn
    UPGRADE = 16   # upgrade asked: wait for the server's 101 before reading more
    BAD = 32       # invalid pipelined request: answered once the earlier ones are


class Exchange:
    """One request on a client connection and its response, from its first byte to its last.

    Immutable defaults live on the class: creating an exchange (once per
    request, on the hot path) sets only what must be per instance.
    """

    # -- the request as parsed
    url: bytes = b""
    method: bytes = b""
    version: str = "1.1"
    head_size: int = 0
    host: bytes = b""
    hosts: int = 0                      # Host fields received (RFC 9112 3.2: one, or none in HTTP/1.0)
    te_chunked: bool | None = None      # Transfer-Encoding seen: does its last coding so far say chunked?
    keep_alive: bool = True             # the client's wish (HTTP/1.0 without keep-alive, Connection: close)
    upgrade: bool = False               # Connection: upgrade asked
    leftover: bytes = b""               # bytes after an Upgrade head: the new protocol's, or the next request
    # -- the request body
    headers_done: bool = False
    complete: bool = False              # the whole request (head and body) was received
    chunked: bool = False               # sent on chunked
    has_body: bool = False
    body_size: int = 0                  # counted against max_body_size
    body_left: int = -2                 # bytes of a Content-Length body still to come; -2: not looked yet
    pending_size: int = 0
    streaming: bool = False             # attached to a server connection: body chunks go straight to it
    # -- the server side
    backend: "BackendState | None" = None
    server: "ServerState | None" = None         # holds a slot (counted in) while set
    server_last: "ServerState | None" = None    # the server it had, for logs and counters
    conn: "HttpServer | None" = None            # the server connection, while attached
    retries: int = 0
    # -- the response
    status: int = 0
    resp_started: bool = False          # its head went to the client
    resp_chunked: bool = False          # the proxy chunks the body to the client
    resp_close: bool = False            # the body ends when the server closes
    client_ka: bool = True              # the client connection stays open after it
    # -- accounting
    bytes_in: int = 0
    bytes_out: int = 0
    t_head: float = -1.0
    t_queue: float = -1.0
    t_connect: float = -1.0
    t_response: float = -1.0
    term: str = "--"                    # HAProxy's termination state, first two letters
    logged: bool = False

    # Body chunks held until the server connection is ready; None until
    # on_body needs a list: most requests have no body.
    pending: "list[bytes] | None" = None

    def __init__(self, now: float) -> None:
        self.t_start: float = now
        self.headers: list[tuple[bytes, bytes]] = []

    def account(self, frontend: "Counters", aborted: bool) -> None:
        """Count the finished exchange on its frontend, backend and server rows.

        ``aborted``: the client left before the end (cli_abrt, on the backend
        and server rows as HAProxy counts it).
        """
        self.logged = True
        bytes_in = self.bytes_in
        bytes_out = self.bytes_out
        status = self.status
        # The usual 2xx is counted here; Counters.status() sorts the rest.
        ok = 200 <= status < 300
        frontend.req_tot += 1
        frontend.bin += bytes_in
        frontend.bout += bytes_out
        if ok:
            frontend.hrsp_2xx += 1
        elif status:
            frontend.status(status)
        backend = self.backend
        if backend is not None:
            bc = backend.counters
            bc.req_tot += 1
            bc.bin += bytes_in
            bc.bout += bytes_out
            if ok:
                bc.hrsp_2xx += 1
            elif status:
                bc.status(status)
            if aborted:
                bc.cli_abrt += 1
        server = self.server_last
        if server is not None:
            sc = server.counters
            sc.stot += 1
            sc.bin += bytes_in
            sc.bout += bytes_out
            if ok:
                sc.hrsp_2xx += 1
            elif status:
                sc.status(status)
            if aborted:
                sc.cli_abrt += 1
