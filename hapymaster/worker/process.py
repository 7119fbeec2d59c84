"""The Worker: listeners, connection limits, the timeout sweeper, stopping.

One ``Worker`` per process. It accepts on the sockets the master bound,
counts connections against ``global.maxconn`` (per worker) and each
frontend's ``maxconn`` (stop accepting at the limit: clients wait in the
kernel backlog, nobody is dropped), and runs one periodic sweeper that checks
every connection's deadlines instead of arming a timer per connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import socket
import time
from collections import deque
from typing import Any, Callable

from hapymaster.config import Config, Frontend
from hapymaster.worker.accesslog import AccessLog, open_sink
from hapymaster.worker.balance import BackendState, Counters, build_backends
from hapymaster.worker.h1 import request_skip

log = logging.getLogger("hapymaster.worker")

BACKLOG = 4096
# Descriptors kept back from the connection budget: listeners, the control
# channel, health checks, log files, the interpreter's own.
FD_RESERVE = 64
# The listening sockets' backlog (the master's listen()): the most one accept
# batch can take in before a pause at maxconn applies.
ACCEPT_BATCH_RESERVE = 1024
# "The worker is full" and "out of descriptors" are logged at most this often
# (a load at the limit would otherwise log at every accept or connect).
FULL_LOG_INTERVAL = 60.0


class Occasional:
    """A condition logged at most once per ``interval``, counting the times in between."""

    def __init__(self, interval: float = FULL_LOG_INTERVAL):
        self.interval = interval
        self.logged_at = -interval
        self.since = 0          # occurrences not logged since the last message

    def due(self, now: float) -> int | None:
        """None: stay quiet; else log now, with this many unlogged occurrences before."""
        if now - self.logged_at < self.interval:
            self.since += 1
            return None
        self.logged_at, since, self.since = now, self.since, 0
        return since


def connection_budget(servers: int) -> int:
    """How many client connections this process's descriptor limit allows; 0: no limit.

    Each client connection may hold two descriptors: its own and one server
    connection, busy or idle in the pool. HAProxy derives its maxconn from
    ``ulimit -n`` the same way. Staying under the limit matters because
    libuv's answer to EMFILE on accept is to accept and close at once every
    client waiting in the backlog (its "emfile trick"): refused clients
    instead of waiting ones. Kept back: the descriptors open now, one per
    server for health checks, a fixed reserve, and room for one accept
    batch: libuv accepts until the backlog is empty before our pause at
    maxconn takes effect, and what it accepted meanwhile is held open.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 16
    batch = min(ACCEPT_BATCH_RESERVE, soft // 8)
    return max(1, (soft - FD_RESERVE - servers - open_now - batch) // 2)

# Makes the protocol of one client connection of a frontend (proxy_http, proxy_tcp).
SessionFactory = Callable[["Worker", "FrontendState"], asyncio.BaseProtocol]


class Listener:
    """One inherited listening socket, served by an asyncio server we can pause.

    ``pause``, ``resume`` and ``close`` may come at any time, also while
    ``start`` is awaiting the event loop: ``accepting`` and ``closed`` say
    what is wanted and ``start`` checks them when its await returns. The
    server object is stored before it starts serving, so that a connection
    accepted in its first loop pass (maxconn reached: pause; a soft stop:
    close) finds it and stops it, instead of leaving it accepting.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.BaseProtocol]):
        self.loop = loop
        self.sock = sock
        self.factory = factory
        self.server: asyncio.AbstractServer | None = None
        self.accepting = True      # False while paused (maxconn)
        self.closed = False        # for good: soft or hard stop
        self.starting = False

    async def start(self) -> None:
        if self.starting or self.server is not None or self.closed or not self.accepting:
            return
        self.starting = True
        try:
            # The asyncio server gets a duplicate: closing it (to pause at
            # maxconn) must not close the socket the master bound for every
            # generation.
            dup = socket.socket(fileno=os.dup(self.sock.fileno()))
            dup.setblocking(False)
            server = await self.loop.create_server(self.factory, sock=dup, backlog=BACKLOG,
                                                   start_serving=False)
        finally:
            self.starting = False
        if self.closed or not self.accepting:
            server.close()      # paused or closed while we were waiting
            return
        self.server = server
        await server.start_serving()

    def pause(self) -> None:
        self.accepting = False
        self._stop_server()

    def resume(self) -> None:
        self.accepting = True
        if self.server is None and not self.starting and not self.closed:
            asyncio.ensure_future(self.start()).add_done_callback(self._started)

    def close(self) -> None:
        self.closed = True
        self._stop_server()
        try:
            self.sock.close()
        except OSError:
            pass

    def _stop_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.close()

    @staticmethod
    def _started(future: "asyncio.Future[None]") -> None:
        if not future.cancelled() and future.exception() is not None:
            log.error("cannot accept again on a listener: %s", future.exception())


class FrontendState:
    """One frontend at runtime: its listeners, limits, counters and routes."""

    def __init__(self, worker: "Worker", config: Frontend, fid: int):
        self.worker = worker
        self.config = config
        self.fid = fid
        self.name = config.name
        self.mode = config.mode
        self.timeout = config.timeout
        self.maxconn = config.maxconn
        self.x_forwarded_for = config.x_forwarded_for
        self.x_forwarded_proto = config.x_forwarded_proto
        self.forwarded = config.forwarded
        # Header names never copied as such: hop-by-hop, and the forwarding
        # fields this frontend writes itself (h1.request_skip).
        self.request_skip = request_skip(config.x_forwarded_for, config.x_forwarded_proto,
                                         config.forwarded)
        self.trusted_proxies = tuple(n.network for n in config.trusted_proxies)
        self.access_log = config.access_log
        self.max_body_size = config.max_body_size
        self.listeners: list[Listener] = []
        self.cur = 0
        self.counters = Counters()
        self.parked: deque[Any] = deque()
        self.paused = False
        self.default_backend: BackendState = worker.backends[config.default_backend]
        # Typed: the compiled request path reads it (mypy 1.0 cannot infer it there).
        self.routes: list[tuple[str | None, bytes | None, BackendState]] = [
            (r.host, r.path_prefix.encode() if r.path_prefix else None,
             worker.backends[r.backend]) for r in config.routes]

    def route(self, req: Any) -> BackendState:
        """First matching route (host and/or path prefix), else default_backend."""
        if not self.routes:
            return self.default_backend
        host = ""
        for name, value in req.headers:
            if name.lower() == b"host":
                host = value.decode("latin-1").lower()
                break
        if host.startswith("["):
            host = host[:host.find("]") + 1]
        elif ":" in host:
            host = host.rsplit(":", 1)[0]
        path = req.url
        for route_host, prefix, backend in self.routes:
            if route_host is not None and route_host != host:
                continue
            if prefix is not None and not path.startswith(prefix):
                continue
            return backend
        return self.default_backend


class Worker:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, generation: int = 0,
                 index: int = 1, master_pid: int = 0, access_log: AccessLog | None = None):
        self.config = config
        self.access_log = access_log or AccessLog(loop, open_sink(config.global_.access_log,
                                                                  generation))
        self.loop = loop
        self.generation = generation
        self.index = index
        self.master_pid = master_pid
        self.started = time.time()
        self.now = loop.time()
        self.clock = loop.time
        self.backends = build_backends(config.backends)
        self.frontends = [FrontendState(self, fe, fid)
                          for fid, fe in enumerate(config.frontends, start=1)]
        self.maxconn = self._effective_maxconn(config)
        self._full = Occasional()
        self._out_of_fds = Occasional()
        self.cur_conns = 0
        self.cum_conns = 0
        self.parked_any = False
        self.sessions: set[Any] = set()
        self.stopping = False
        # How long a soft-stopped worker keeps an idle keep-alive client
        # connection; never beyond hard_stop_after, when the master kills it.
        self.soft_stop_grace = min(config.global_.soft_stop_grace,
                                   config.global_.hard_stop_after)
        self.exit_future: asyncio.Future = loop.create_future()
        self.control: Any = None
        self.stats_listener: Listener | None = None
        self.checks: Any = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.tick = self._tick_interval()

    def _effective_maxconn(self, config: Config) -> int:
        """global.maxconn, lowered to what the descriptor limit can carry."""
        configured = config.global_.maxconn
        budget = connection_budget(sum(len(b.servers) for b in config.backends))
        if not budget or (configured and configured <= budget):
            return configured
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        # A maxconn set above the limit is worth a warning from every worker;
        # one derived from the limit is said once, by the first worker of the
        # first generation: the same line from every worker at every reload
        # was noise in the journal (and ~0.3 ms of each worker's start).
        level = logging.WARNING if configured else \
            logging.INFO if self.generation <= 1 and self.index == 1 else logging.DEBUG
        log.log(level, "the file descriptor limit (%d, ulimit -n / LimitNOFILE=) allows %d "
                "connections per worker: maxconn is %d%s", soft, budget, budget,
                f" instead of {configured}" if configured else "")
        return budget

    def open_connection(self, factory: Callable[[], Any], host: str, port: int,
                        done: Callable[[Any, OSError | None], None]) -> "asyncio.Task[Any]":
        """Connect to a server: ``done(protocol, None)``, or ``done(None, error)`` if it failed.

        A task and its done callback, no coroutine of the caller's: the
        protocols are compiled, and mypyc 1.0 (Debian 12's) mishandles an
        exception raised into a compiled coroutine ("TypeError: invalid
        exception object"). Nothing is called for a task cancelled by its
        caller; an error that is not an OSError goes to the loop's handler.
        """
        def opened(task: "asyncio.Task[Any]") -> None:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is None:
                done(task.result()[1], None)
            elif isinstance(exc, OSError):
                self.note_connect_error(exc)
                done(None, exc)
            else:
                raise exc

        task = self.loop.create_task(self.loop.create_connection(factory, host, port))
        task.add_done_callback(opened)
        return task

    def note_connect_error(self, exc: OSError) -> None:
        """A connect to a server failed: say so when it is us, not the server, that is out.

        EMFILE/ENFILE on connect means this worker (or the machine) has no
        descriptor left; every request then fails with 503 until some close.
        Logged once a minute at most, with how many failed meanwhile.
        """
        if exc.errno not in (errno.EMFILE, errno.ENFILE):
            return
        before = self._out_of_fds.due(self.loop.time())
        if before is None:
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        log.error("out of file descriptors (limit %d): cannot connect to servers, %d "
                  "connect(s) failed; raise LimitNOFILE= or lower maxconn", soft, before + 1)

    def _note_full(self) -> None:
        """Log that the worker stopped accepting at its limit; once a minute at most."""
        before = self._full.due(self.loop.time())
        if before is None:
            return
        more = f" ({before} more time(s) since the last message)" if before else ""
        log.warning("worker reached maxconn %d: new clients wait in the backlog%s",
                    self.maxconn, more)

    def _tick_interval(self) -> float:
        """A quarter of the smallest timeout, between 10 ms and 500 ms."""
        smallest = 2.0
        for item in (*self.config.frontends, *self.config.backends):
            t = item.timeout
            smallest = min(smallest, t.connect, t.client, t.server, t.queue, t.tunnel,
                           t.head, t.http_keep_alive)
        return max(0.01, min(0.5, smallest / 4))

    # --- listeners ------------------------------------------------------------

    async def open_listeners(self, listeners: list[dict[str, Any]],
                             protocols: dict[str, SessionFactory],
                             stats: Callable[["Worker"], asyncio.BaseProtocol] | None = None
                             ) -> None:
        """Attach every frontend (and the stats page) to its inherited socket.

        ``protocols`` gives, per mode (``http``, ``tcp``), the function that
        makes the protocol of one client connection; the entry point passes
        them, so that this module imports none of the proxies (which use it).
        """
        by_address = {}
        for item in listeners:
            sock = socket.socket(fileno=int(item["fd"]))
            sock.setblocking(False)
            by_address[item["address"]] = sock
        for fe in self.frontends:
            make = protocols[fe.mode]
            for address in fe.config.bind:
                sock = by_address.pop(str(address), None)
                if sock is None:
                    raise RuntimeError(f"the master passed no socket for frontend "
                                       f"{fe.name!r} bind {address}")
                listener = Listener(self.loop, sock, lambda fe=fe, make=make: make(self, fe))
                await listener.start()
                fe.listeners.append(listener)
        stats_bind = self.config.global_.stats
        if stats_bind is not None and stats is not None:
            sock = by_address.pop(str(stats_bind.bind), None)
            if sock is None:
                raise RuntimeError(f"the master passed no socket for stats bind "
                                   f"{stats_bind.bind}")
            self.stats_listener = Listener(self.loop, sock, lambda: stats(self))
            await self.stats_listener.start()
        for address, sock in by_address.items():
            log.warning("listener %s matches no frontend, closing it here", address)
            sock.close()

    # --- connection accounting (maxconn) --------------------------------------

    def admit(self, session: Any, fe: FrontendState) -> bool:
        """Count a new connection in; False means: park it until a slot frees."""
        self.sessions.add(session)
        fe.counters.stot += 1
        self.cum_conns += 1
        if (fe.maxconn and fe.cur >= fe.maxconn) or (self.maxconn and self.cur_conns >= self.maxconn):
            # Accepted in the same batch as the one that reached the limit:
            # hold it unread rather than drop it.
            fe.parked.append(session)
            self._update_accepting(fe)
            return False
        self._count_in(fe)
        return True

    def _count_in(self, fe: FrontendState) -> None:
        fe.cur += 1
        self.cur_conns += 1
        if fe.cur > fe.counters.smax:
            fe.counters.smax = fe.cur
        if self.maxconn and self.cur_conns >= self.maxconn:
            self._note_full()
        if (fe.maxconn and fe.cur >= fe.maxconn) or (self.maxconn and self.cur_conns >= self.maxconn):
            self._update_accepting(fe)

    def release_conn(self, session: Any, fe: FrontendState) -> None:
        self.sessions.discard(session)
        try:
            fe.parked.remove(session)
            return
        except ValueError:
            pass
        fe.cur -= 1
        self.cur_conns -= 1
        self._unpark()
        if self.stopping and not self.sessions:
            self._finish_stop_when_idle()

    def session_closed(self, session: Any) -> None:
        """A session outside the frontends' accounting (a stats page client)
        ended: a soft stop waiting for the last session may finish now."""
        self.sessions.discard(session)
        if self.stopping and not self.sessions:
            self._finish_stop_when_idle()

    def _unpark(self) -> None:
        for fe in self.frontends:
            while fe.parked and not (fe.maxconn and fe.cur >= fe.maxconn) and \
                    not (self.maxconn and self.cur_conns >= self.maxconn):
                session = fe.parked.popleft()
                self._count_in(fe)
                session.start()
        for fe in self.frontends:
            self._update_accepting(fe)

    def _update_accepting(self, fe: FrontendState) -> None:
        full = (fe.maxconn and fe.cur >= fe.maxconn) or \
            (self.maxconn and self.cur_conns >= self.maxconn) or bool(fe.parked)
        if self.stopping:
            return
        if full and not fe.paused:
            fe.paused = True
            for listener in fe.listeners:
                listener.pause()
        elif not full and fe.paused:
            fe.paused = False
            for listener in fe.listeners:
                listener.resume()

    # --- timeouts -------------------------------------------------------------

    def start_sweeper(self) -> None:
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

    def _sweep(self) -> None:
        now = self.now = self.loop.time()
        for session in list(self.sessions):
            try:
                session.expire(now)
            except Exception:  # noqa: BLE001 - one broken session must not stop the sweeper
                log.exception("timeout handling failed; closing the connection")
                session.abort()
        self._sweeper = self.loop.call_later(self.tick, self._sweep)

    # --- stopping ---------------------------------------------------------------

    def soft_stop(self, reason: str = "soft stop") -> None:
        """Stop accepting, let busy connections finish, then exit 0.

        Every session decides for itself what finishing means (an HTTP
        client connection answers its request in flight with Connection:
        close, an idle one waits ``soft_stop_grace`` for a last request; a
        TCP session runs until its peers end it). Idle pooled server
        connections have nothing left to do: they are closed now, and no
        connection goes back to the pool from here on.
        """
        if self.stopping:
            return
        log.info("%s: closing listeners, %d connection(s) to finish", reason, len(self.sessions))
        self.stopping = True
        self._close_listeners()
        if self.checks is not None:
            self.checks.stop()
        for backend in self.backends.values():
            for server in backend.servers:
                server.pool.close_all()
        # Parked connections (accepted beyond maxconn) are served too, as
        # slots free: their clients sent a request to this worker.
        for session in list(self.sessions):
            session.soft_stop()
        self._finish_stop_when_idle()

    def hard_stop(self, reason: str = "stop") -> None:
        log.info("%s: closing %d connection(s) now", reason, len(self.sessions))
        self.stopping = True
        self._close_listeners()
        if self.checks is not None:
            self.checks.stop()
        for session in list(self.sessions):
            session.abort()
        self._finish_stop()

    def _close_listeners(self) -> None:
        for fe in self.frontends:
            for listener in fe.listeners:
                listener.close()
        if self.stats_listener is not None:
            self.stats_listener.close()

    def _finish_stop_when_idle(self) -> None:
        # A connection accepted in the same loop pass as the signal has its
        # connection_made still queued: it is not in self.sessions yet. Decide
        # after the queued callbacks ran (the listeners are closed, so no
        # new ones come), or that client gets a closed socket and no answer.
        self.loop.call_soon(self._finish_if_idle)

    def _finish_if_idle(self) -> None:
        if not self.sessions:
            self._finish_stop()

    def _finish_stop(self) -> None:
        if not self.exit_future.done():
            self.exit_future.set_result(0)

    def install_signals(self) -> None:
        loop = self.loop
        loop.add_signal_handler(signal.SIGUSR1, self.soft_stop, "SIGUSR1 (soft stop)")
        loop.add_signal_handler(signal.SIGTERM, self.hard_stop, "SIGTERM")
        # Ctrl-C reaches the whole foreground process group; the master decides.
        signal.signal(signal.SIGINT, signal.SIG_IGN)

    def master_gone(self) -> None:
        """EOF on the control channel: the master died. Finish quickly and leave."""
        log.warning("the master closed the control channel; leaving")
        self.soft_stop("master gone")
        self.loop.call_later(min(5.0, self.config.global_.hard_stop_after), self.hard_stop,
                             "master gone, connections left")
