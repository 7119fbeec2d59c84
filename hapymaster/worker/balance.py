"""Backends and servers as the worker sees them at runtime.

The config is frozen; what changes while a worker runs (administrative state,
weights set from the CLI, health, connection counts, the queue, counters)
lives here, one ``ServerState`` per configured server and one ``BackendState``
per backend. Balancing is synchronous and callback based: a session asks
``take()`` for a server and gets one, or is queued and called back later by
``release()``, or learns at once that no server can serve (503 / close).
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections import deque
from typing import Any, Callable

from hapymaster.config import Backend, HealthCheck, Server
from hapymaster.worker.pool import ServerPool

ADMIN_STATES = ("ready", "drain", "maint")

# What take() answers when there is no server to wait for at all.
NO_SERVER = object()


# The counters' names, in the order of the stats; stats.py sums them across
# workers. A tuple of its own: compiled, the class has no __slots__ to read.
COUNTER_FIELDS = ("stot", "bin", "bout", "req_tot", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx",
                  "hrsp_4xx", "hrsp_5xx", "hrsp_other", "ereq", "econ", "eresp", "wretr",
                  "wredis", "cli_abrt", "srv_abrt", "dreq", "dresp", "lbtot", "smax", "qmax",
                  "chkfail", "chkdown", "downtime", "ctime_sum", "rtime_sum", "ttime_sum")


class Counters:
    """Monotonic counters of one proxy or server, summed across workers."""

    def __init__(self) -> None:
        # Spelt out, not a loop over COUNTER_FIELDS: the compiled request
        # path (mypyc) reads these as typed int fields.
        self.stot: int = 0
        self.bin: int = 0
        self.bout: int = 0
        self.req_tot: int = 0
        self.hrsp_1xx: int = 0
        self.hrsp_2xx: int = 0
        self.hrsp_3xx: int = 0
        self.hrsp_4xx: int = 0
        self.hrsp_5xx: int = 0
        self.hrsp_other: int = 0
        self.ereq: int = 0
        self.econ: int = 0
        self.eresp: int = 0
        self.wretr: int = 0
        self.wredis: int = 0
        self.cli_abrt: int = 0
        self.srv_abrt: int = 0
        self.dreq: int = 0
        self.dresp: int = 0
        self.lbtot: int = 0
        self.smax: int = 0
        self.qmax: int = 0
        self.chkfail: int = 0
        self.chkdown: int = 0
        self.downtime: int = 0
        self.ctime_sum: int = 0
        self.rtime_sum: int = 0
        self.ttime_sum: int = 0

    def status(self, code: int) -> None:
        klass = code // 100
        if klass == 2:
            self.hrsp_2xx += 1
        elif klass == 3:
            self.hrsp_3xx += 1
        elif klass == 4:
            self.hrsp_4xx += 1
        elif klass == 5:
            self.hrsp_5xx += 1
        elif klass == 1:
            self.hrsp_1xx += 1
        else:
            self.hrsp_other += 1

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTER_FIELDS}


def _mix64(value: int) -> int:
    """splitmix64 finaliser: spreads a 32/64-bit value over 64 bits."""
    value = (value + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return value ^ (value >> 31)


class Draws:
    """Uniform random draws for the random algorithm and the checks' jitter.

    splitmix64 over a counter seeded from os.urandom, re-seeded in every
    forked process: all that balancing needs, without the random module
    (~0.15 MiB of each worker's RSS for two calls, issue 9).
    """

    def __init__(self) -> None:
        self.state = 0
        self.seed()

    def seed(self) -> None:
        self.state = int.from_bytes(os.urandom(8), "little")

    def fraction(self) -> float:
        """A float in [0, 1), 53 random bits."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        return (_mix64(self.state) >> 11) / 9007199254740992.0


DRAWS = Draws()
# Workers are forked from the template: each must draw its own numbers.
os.register_at_fork(after_in_child=DRAWS.seed)


def _weighted_draw(servers: list[ServerState]) -> ServerState:
    point = DRAWS.fraction() * sum(s.weight for s in servers)
    for server in servers:
        point -= server.weight
        if point < 0:
            return server
    return servers[-1]      # rounding at the very top


class ServerState:
    """One configured server: its runtime state, counters and idle connections."""

    def __init__(self, backend: "BackendState", config: Server, sid: int):
        self.backend = backend
        self.config = config
        self.name = config.name
        self.sid = sid
        self.host = config.address.host
        self.port = config.address.port
        self.address = str(config.address)
        self.backup = config.backup
        self.maxconn = config.maxconn
        self.initial_weight = config.weight
        self.weight = config.weight
        self.weight_set_at_runtime = False
        self.admin = "ready"
        self.checked = config.check
        self.up = True                    # health: False once `fall` checks failed
        self.check_rise = 0               # consecutive successes while down
        self.check_fall = 0               # consecutive failures while up
        self.check_status = ""            # HAProxy-style: L4OK, L4CON, L4TOUT, L7OK, L7STS, L7RSP
        self.check_code = 0
        self.check_duration_ms = -1
        self.check_desc = ""
        self.last_change = time.time()
        self.down_since: float | None = None
        self.cur = 0                      # sessions (tcp) or requests (http) in progress
        self.counters = Counters()
        self.current_weight = 0           # smooth weighted round robin accumulator
        self.seed = _mix64(zlib.crc32(self.name.encode()))
        self.pool = ServerPool()          # idle keep-alive server connections (http)

    @property
    def usable(self) -> bool:
        """May receive new traffic."""
        return self.admin == "ready" and self.up and self.weight > 0

    @property
    def full(self) -> bool:
        return self.maxconn > 0 and self.cur >= self.maxconn

    @property
    def status_text(self) -> str:
        """The status column of the stats: UP, DOWN, MAINT, DRAIN, NOLB."""
        if self.admin == "maint":
            return "MAINT"
        if not self.up:
            return "DOWN"
        if self.admin == "drain":
            return "DRAIN"
        return "UP"

    def set_admin(self, state: str) -> None:
        if state != self.admin:
            self.admin = state
            self.last_change = time.time()
            self.backend.changed()
            if state != "ready":
                self.pool.close_all()
            else:
                self.backend.wake()

    def set_health(self, up: bool) -> None:
        if up == self.up:
            return
        now = time.time()
        self.up = up
        self.last_change = now
        self.backend.changed()
        if up:
            if self.down_since is not None:
                self.counters.downtime += int(now - self.down_since)
            self.down_since = None
            self.backend.wake()
        else:
            self.counters.chkdown += 1
            self.down_since = now
            self.pool.close_all()

    def set_weight(self, weight: int, runtime: bool = True) -> None:
        self.weight = weight
        self.weight_set_at_runtime = runtime
        self.current_weight = 0
        self.backend.changed()
        if weight > 0:
            self.backend.wake()


class BackendState:
    """One backend: the servers, the balancing algorithm and the queue."""

    def __init__(self, config: Backend, bid: int):
        self.config = config
        self.name = config.name
        self.bid = bid
        self.mode = config.mode
        self.timeout = config.timeout
        self.servers = [ServerState(self, server, sid) for sid, server in
                        enumerate(config.servers, start=1)]
        self.by_name = {server.name: server for server in self.servers}
        self.check: HealthCheck | None = config.check
        self.counters = Counters()
        self.cur = 0
        self.queue: deque[Any] = deque()   # sessions waiting for a free server slot
        self._rotate = 0
        self._candidates: list[ServerState] | None = None
        self.limited = False
        self.last_change = time.time()
        pick = getattr(self, f"_pick_{config.balance}")
        self._pick: Callable[[list[ServerState], bytes], ServerState] = pick

    # --- choosing ------------------------------------------------------------

    def candidates(self) -> list[ServerState]:
        """Servers that may take new traffic: the active ones, else the backups.

        Cached: it changes only when a server's admin state, health or weight
        does (``changed()``), not per request.
        """
        cached = self._candidates
        if cached is None:
            cached = [s for s in self.servers if not s.backup and s.usable]
            if not cached:
                cached = [s for s in self.servers if s.backup and s.usable]
            self._candidates = cached
            self.limited = any(s.maxconn for s in cached)
        return cached

    def changed(self) -> None:
        self._candidates = None
        self.last_change = time.time()

    @property
    def is_up(self) -> bool:
        return any(s.usable for s in self.servers)

    def take(self, session: Any, client_key: bytes) -> Any:
        """A server for ``session`` (counted in), or None when it was queued, or NO_SERVER.

        A queued session gets ``session.on_server(server)`` later, from release(),
        or is removed by ``dequeue`` when its queue timeout fires.
        """
        # The cache checked here, not by calling candidates(): one call less
        # per request on the hot path.
        candidates = self._candidates
        if candidates is None:
            candidates = self.candidates()
        if not candidates:
            return NO_SERVER
        free = [s for s in candidates if not s.full] if self.limited else candidates
        if not free or self.queue:
            session.client_key = client_key
            self.queue.append(session)
            if len(self.queue) > self.counters.qmax:
                self.counters.qmax = len(self.queue)
            return None
        server = free[0] if len(free) == 1 else self._pick(free, client_key)
        self._count_in(server)
        return server

    def _count_in(self, server: ServerState) -> None:
        server.cur += 1
        server.counters.lbtot += 1
        if server.cur > server.counters.smax:
            server.counters.smax = server.cur
        self.cur += 1
        if self.cur > self.counters.smax:
            self.counters.smax = self.cur

    def release(self, server: ServerState) -> None:
        server.cur -= 1
        self.cur -= 1
        if self.queue:
            self.wake()

    def dequeue(self, session: Any) -> None:
        try:
            self.queue.remove(session)
        except ValueError:
            pass

    def wake(self) -> None:
        """Give free slots to queued sessions, oldest first; fail them if no server is left."""
        while self.queue:
            candidates = self.candidates()
            if not candidates:
                waiting, self.queue = self.queue, deque()
                for session in waiting:
                    session.on_server(None)
                return
            free = [s for s in candidates if not s.full]
            if not free:
                return
            session = self.queue.popleft()
            server = free[0] if len(free) == 1 else self._pick(free, session.client_key)
            self._count_in(server)
            session.on_server(server)

    # --- algorithms ----------------------------------------------------------

    def _pick_roundrobin(self, servers: list[ServerState], key: bytes) -> ServerState:
        # Smooth weighted round robin (nginx): a weight 5/1/1 set gives
        # a a b a c a a, not a a a a a b c.
        total = 0
        best: ServerState | None = None
        for server in servers:
            server.current_weight += server.weight
            total += server.weight
            if best is None or server.current_weight > best.current_weight:
                best = server
        assert best is not None     # servers is never empty (take, wake)
        best.current_weight -= total
        return best

    def _pick_leastconn(self, servers: list[ServerState], key: bytes) -> ServerState:
        # Fewest sessions per unit of weight; ties rotate so that an idle
        # backend still spreads requests.
        self._rotate += 1
        count = len(servers)
        best: ServerState | None = None
        best_load = 0.0
        for index in range(count):
            server = servers[(index + self._rotate) % count]
            load = (server.cur + 1) / server.weight
            if best is None or load < best_load:
                best, best_load = server, load
        assert best is not None
        return best

    def _pick_source(self, servers: list[ServerState], key: bytes) -> ServerState:
        # Weighted rendezvous hashing: each client address ranks the servers
        # by a hash of (address, server); when a server leaves only its own
        # clients move, and they come back when it returns.
        client = zlib.crc32(key)
        best: ServerState | None = None
        best_score = 0.0
        for server in servers:
            hashed = _mix64(client ^ server.seed)
            score = -server.weight / math.log((hashed + 1) / 18446744073709551617.0)
            if best is None or score > best_score:
                best, best_score = server, score
        assert best is not None
        return best

    def _pick_first(self, servers: list[ServerState], key: bytes) -> ServerState:
        # Servers are in config order and the full ones were already left out.
        return servers[0]

    def _pick_random(self, servers: list[ServerState], key: bytes) -> ServerState:
        # Power of two choices: two weighted random draws, keep the less loaded.
        first, second = _weighted_draw(servers), _weighted_draw(servers)
        if (second.cur / second.weight) < (first.cur / first.weight):
            return second
        return first


def build_backends(backends: tuple[Backend, ...]) -> dict[str, BackendState]:
    return {backend.name: BackendState(backend, bid)
            for bid, backend in enumerate(backends, start=1)}
