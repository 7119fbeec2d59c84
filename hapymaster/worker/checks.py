"""Health checks: a TCP connect, or an HTTP request whose status must fall in
the backend's ``check.expect`` range (200-399 by default).

Every checked server has its own task. A server that is up goes down after
``fall`` consecutive failures; a server that is down comes back after
``rise`` consecutive successes. Each change is logged (and, in HTTP mode,
queued requests are failed at once when the last server of a backend goes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from hapymaster.config import HealthCheck
from hapymaster.worker.balance import DRAWS, BackendState, ServerState

if TYPE_CHECKING:
    from hapymaster.worker.process import Worker

log = logging.getLogger("hapymaster.worker")

DEFAULT_CHECK = HealthCheck()


class HealthChecker:
    def __init__(self, worker: "Worker"):
        self.worker = worker
        self.tasks: list[asyncio.Task] = []

    def start(self) -> None:
        for backend in self.worker.backends.values():
            for server in backend.servers:
                if server.checked:
                    self.tasks.append(asyncio.ensure_future(self._run(backend, server)))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks = []

    async def _run(self, backend: BackendState, server: ServerState) -> None:
        check = backend.check or DEFAULT_CHECK
        # Spread the first checks so that N workers x M servers do not all
        # connect in the same millisecond.
        await asyncio.sleep(DRAWS.fraction() * min(check.interval, 0.05))
        while True:
            started = time.monotonic()
            ok, status, code, desc = await self.probe(backend, server, check)
            server.check_duration_ms = int((time.monotonic() - started) * 1000)
            server.check_status = status
            server.check_code = code
            server.check_desc = desc
            self.record(backend, server, check, ok)
            await asyncio.sleep(check.interval)

    async def probe(self, backend: BackendState, server: ServerState,
                    check: HealthCheck) -> tuple[bool, str, int, str]:
        timeout = backend.timeout.check
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(server.host, server.port), timeout)
            except asyncio.TimeoutError:
                return False, "L4TOUT", 0, "connection timeout"
            except OSError as exc:
                return False, "L4CON", 0, exc.strerror or str(exc)
            if check.http_method is None:
                return True, "L4OK", 0, "connected"
            request = (f"{check.http_method} {check.http_path} HTTP/1.0\r\n"
                       f"Host: {server.address}\r\nUser-Agent: hapymaster-check\r\n"
                       f"Connection: close\r\n\r\n").encode()
            writer.write(request)
            try:
                line = await asyncio.wait_for(reader.readline(), timeout)
            except asyncio.TimeoutError:
                return False, "L7TOUT", 0, "response timeout"
            except OSError as exc:
                return False, "L7RSP", 0, exc.strerror or str(exc)
            parts = line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
                return False, "L7RSP", 0, "not an HTTP response"
            code = int(parts[1])
            low, high = check.expect_status
            if low <= code <= high:
                return True, "L7OK", code, line.decode("latin-1").strip()
            return False, "L7STS", code, line.decode("latin-1").strip()
        finally:
            if writer is not None:
                writer.close()

    def record(self, backend: BackendState, server: ServerState, check: HealthCheck,
               ok: bool) -> None:
        if ok:
            server.check_fall = 0
            if not server.up:
                server.check_rise += 1
                if server.check_rise >= check.rise:
                    server.check_rise = 0
                    server.set_health(True)
                    log.warning("Server %s/%s is UP, reason: Layer%s check passed, "
                                "check duration: %dms. %d active and %d backup servers online.",
                                backend.name, server.name, server.check_status[1],
                                server.check_duration_ms, *self._online(backend))
        else:
            server.counters.chkfail += 1
            server.check_rise = 0
            if server.up:
                server.check_fall += 1
                if server.check_fall >= check.fall:
                    server.check_fall = 0
                    server.set_health(False)
                    active, backup = self._online(backend)
                    log.warning("Server %s/%s is DOWN, reason: %s (%s), check duration: %dms. "
                                "%d active and %d backup servers left.",
                                backend.name, server.name, server.check_status,
                                server.check_desc, server.check_duration_ms, active, backup)
                    if not backend.is_up:
                        log.error("backend %s has no server available!", backend.name)
                        backend.wake()

    @staticmethod
    def _online(backend: BackendState) -> tuple[int, int]:
        active = sum(1 for s in backend.servers if s.usable and not s.backup)
        backup = sum(1 for s in backend.servers if s.usable and s.backup)
        return active, backup
