"""The master: the process list, starting workers, reloads, signals.

Everything that changes the process list lives in this file, and all of it
runs on one asyncio loop, so no two transitions ever interleave half-way.
Signal handlers only hand the signal to the loop (asyncio's self-pipe);
SIGCHLD is reaped there too. The lifecycle of a worker:

    spawn ──► INIT ──_send_status READY──► READY ──next reload──► LEAVING ──exit──► gone

A reload, top to bottom, is ``Master._reload_once``:
re-read the config, count the reload on every live worker, start the new
generation, wait until all of it is READY, then the two passes
``sigterm_workers_over_max_reloads`` and ``soft_stop_previous_generation``.
"""

from __future__ import annotations

import asyncio
import enum
import importlib.metadata
import json
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from . import __version__
from .config import Address, Config, ConfigError, parse_config, read_config
from .forkserver import ForkServer, ForkServerError
from .pdeathsig import become_subreaper
from .sdnotify import monotonic_usec, notify, watchdog_interval

log = logging.getLogger("hapymaster.master")

LISTEN_BACKLOG = 1024
RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 10.0
# A replacement worker that stays up this long resets the backoff: it was a
# one-off crash, not a crash loop.
RESTART_BACKOFF_RESET_AFTER = 30.0
WORKER_COMMAND_TIMEOUT = 5.0


class WorkerState(enum.Enum):
    INIT = "init"          # forked, not READY yet
    READY = "ready"        # serving, part of the current or a failed-but-started generation
    LEAVING = "leaving"    # superseded: signalled to stop, finishing its connections


@dataclass(eq=False)
class Worker:
    pid: int
    generation: int
    index: int
    version: str
    started_at: float
    control: "ControlChannel"
    state: WorkerState = WorkerState.INIT
    reloads: int = 0
    # Every signal the master ever sent this worker: the guard that keeps a
    # worker from getting the same signal twice, or two signals in one reload.
    signals_sent: list[signal.Signals] = field(default_factory=list)

    def describe(self) -> str:
        return f"worker {self.pid} (generation {self.generation}, #{self.index})"


@dataclass
class ReloadResult:
    success: bool
    messages: list[str]

    def render(self) -> str:
        lines = [f"Success={int(self.success)}", "--", *self.messages]
        return "\n".join(lines) + "\n"


class ReloadFailed(Exception):
    pass


def installed_version() -> str:
    """The version on disk now: after a package upgrade, new workers run it."""
    try:
        return importlib.metadata.version("hapymaster")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def bind_listener(address: Address) -> socket.socket:
    infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ControlChannel(asyncio.Protocol):
    """The master's end of one worker's socketpair.

    Lines from the worker are either the hidden ``_send_status READY`` or JSON
    messages (command replies, gather requests). This is the only place where
    ``_send_status`` is believed: the socketpair was created by the master for
    this worker alone, so whoever writes here is that worker.
    """

    def __init__(self, master: "Master"):
        self.master = master
        self.worker: Worker | None = None
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            self.line_received(line.decode("utf-8", "replace"))

    def line_received(self, line: str) -> None:
        if self.worker is None:
            return
        if not line.startswith("{"):
            self.master.worker_said(self.worker, line.strip())
            return
        try:
            message = json.loads(line)
        except ValueError:
            log.warning("%s sent a malformed control message", self.worker.describe())
            return
        kind = message.get("type")
        if kind == "cli_reply":
            future = self.pending.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(str(message.get("output", "")))
        elif kind == "gather":
            asyncio.ensure_future(self._answer_gather(message))

    async def _answer_gather(self, message: dict[str, Any]) -> None:
        outputs = await self.master.gather(str(message.get("command", "")))
        self.send({"type": "gathered", "id": message.get("id"), "outputs": outputs})

    def connection_lost(self, exc: Exception | None) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ConnectionError("worker closed its control channel"))
        self.pending.clear()
        self.transport = None

    def send(self, message: dict[str, Any]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(message).encode() + b"\n")

    async def ask(self, command: str, timeout: float = WORKER_COMMAND_TIMEOUT) -> str:
        """Run a CLI command on the worker and return its answer."""
        if self.transport is None or self.transport.is_closing():
            raise ConnectionError("worker is gone")
        self.next_id += 1
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        self.send({"type": "cli", "id": self.next_id, "command": command})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            self.pending.pop(self.next_id, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Master:
    def __init__(self, config: Config, config_text: str, config_path: str | None,
                 socket_path: str, load: Callable[[], tuple[Config, str]]):
        self.config = config
        self.config_text = config_text
        self.config_path = config_path
        self.socket_path = socket_path
        self._load_config = load
        self.processes: list[Worker] = []
        self.listeners: dict[Address, socket.socket] = {}
        self.generation = 0            # the current generation (last that became READY)
        self.last_generation = 0       # the newest generation started, READY or not
        self.reloads = 0               # successful reloads
        self.failed_reloads = 0
        self.started_at = time.monotonic()
        self.version = __version__
        self.stopping = False
        self.exit_code = 0
        self._ready_waiters: list[asyncio.Future[None]] = []
        self._reload_queue: list[tuple[bool, asyncio.Future[ReloadResult]]] = []
        self._reloader: asyncio.Task[None] | None = None
        self._restart_backoff: dict[int, float] = {}
        self._last_state: Any = None
        self._done = asyncio.Event()
        self._cli_server: asyncio.AbstractServer | None = None
        self.on_stop: list[Callable[[], None]] = []
        self.forkserver = ForkServer()  # the worker template every worker is forked from

    # --- the process list ---------------------------------------------------

    def current_workers(self) -> list[Worker]:
        return [w for w in self.processes if w.generation == self.generation
                and w.state is not WorkerState.LEAVING]

    def old_workers(self) -> list[Worker]:
        return [w for w in self.processes if w.generation < self.generation
                or w.state is WorkerState.LEAVING]

    def find_worker(self, pid: int) -> Worker | None:
        return next((w for w in self.processes if w.pid == pid), None)

    def send_signal(self, worker: Worker, sig: signal.Signals, why: str) -> bool:
        """Signal a worker unless it already had this signal; True if sent."""
        if sig in worker.signals_sent:
            return False
        worker.signals_sent.append(sig)
        log.info("sending %s to %s, reloads %d: %s", sig.name, worker.describe(),
                 worker.reloads, why,
                 extra={"HAPYMASTER_GENERATION": str(worker.generation),
                        "HAPYMASTER_WORKER_PID": str(worker.pid),
                        "HAPYMASTER_SIGNAL": sig.name})
        try:
            os.kill(worker.pid, sig)
        except ProcessLookupError:
            pass
        return True

    # --- listening sockets ----------------------------------------------------

    def wanted_addresses(self, config: Config) -> list[Address]:
        addresses = [address for frontend in config.frontends for address in frontend.bind]
        if config.global_.stats is not None:
            addresses.append(config.global_.stats.bind)
        return addresses

    def bind_new_listeners(self, config: Config) -> list[Address]:
        """Bind the addresses ``config`` needs that we do not hold yet.

        Existing sockets are kept as they are: a reload never rebinds, so no
        client connecting during a reload is ever refused.
        """
        added: list[Address] = []
        try:
            for address in self.wanted_addresses(config):
                if address not in self.listeners:
                    self.listeners[address] = bind_listener(address)
                    added.append(address)
        except OSError as exc:
            self.close_listeners(added)
            raise ReloadFailed(f"{config.source}: cannot bind {address}: {exc.strerror}") from None
        return added

    def close_listeners(self, addresses: list[Address]) -> None:
        for address in addresses:
            sock = self.listeners.pop(address, None)
            if sock is not None:
                sock.close()

    def close_unused_listeners(self) -> None:
        wanted = set(self.wanted_addresses(self.config))
        self.close_listeners([a for a in self.listeners if a not in wanted])

    # --- starting workers -----------------------------------------------------

    async def spawn_worker(self, generation: int, index: int, config: Config, text: str,
                           state: Any) -> Worker:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        wanted = set(self.wanted_addresses(config))
        listeners = [(str(address), sock.fileno()) for address, sock in self.listeners.items()
                     if address in wanted]
        try:
            await self.forkserver.ensure(config.global_.ready_timeout)
            started_at = time.monotonic()  # "READY in" counts the fork too
            pid = self.forkserver.spawn(child_end, [fd for _, fd in listeners], os.getpid())
        except ForkServerError as exc:
            parent_end.close()
            raise ReloadFailed(str(exc)) from None
        finally:
            child_end.close()
        # In the list before the next await: a forked worker can exit (and be
        # reaped) within one loop iteration, and an unknown pid would be lost.
        channel = ControlChannel(self)
        worker = Worker(pid=pid, generation=generation, index=index,
                        version=installed_version(), started_at=started_at, control=channel)
        channel.worker = worker
        self.processes.append(worker)
        await asyncio.get_running_loop().create_unix_connection(lambda: channel, sock=parent_end)
        channel.send({"type": "boot", "generation": generation, "index": index,
                      "master_pid": os.getpid(), "config_path": config.source,
                      "config_text": text,
                      "listeners": [{"address": a, "fd": fd} for a, fd in listeners],
                      "state": state})
        log.info("started %s", worker.describe(),
                 extra={"HAPYMASTER_GENERATION": str(generation),
                        "HAPYMASTER_WORKER_PID": str(worker.pid)})
        return worker

    async def carried_state(self) -> Any:
        """Runtime state (weights, admin and health states) of a current worker.

        Handed to the next generation, so what an operator set at runtime and
        what the health checks found survive a reload.
        """
        for worker in self.current_workers():
            if worker.state is WorkerState.READY:
                try:
                    self._last_state = json.loads(await worker.control.ask("_state"))
                    break
                except (ConnectionError, asyncio.TimeoutError, ValueError) as exc:
                    log.warning("could not read the runtime state of %s: %s",
                                worker.describe(), exc)
        return self._last_state

    async def start_generation(self, config: Config, text: str, state: Any) -> list[Worker]:
        self.last_generation += 1
        workers: list[Worker] = []
        try:
            for index in range(1, config.global_.workers + 1):
                workers.append(await self.spawn_worker(self.last_generation, index, config,
                                                       text, state))
        except ReloadFailed:
            self.abandon(workers, "the rest of its generation could not be started")
            raise
        return workers

    async def wait_ready(self, workers: list[Worker], timeout: float) -> None:
        """Return when every worker is READY; raise ReloadFailed if one exits or is late."""
        deadline = time.monotonic() + timeout
        while True:
            dead = [w for w in workers if w not in self.processes]
            if dead:
                raise ReloadFailed(f"{dead[0].describe()} exited before it was READY")
            if all(w.state is WorkerState.READY for w in workers):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                late = [w for w in workers if w.state is WorkerState.INIT]
                raise ReloadFailed(f"{late[0].describe()} was not READY within {timeout:g}s")
            waiter = asyncio.get_running_loop().create_future()
            self._ready_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except asyncio.TimeoutError:
                pass
            finally:
                if waiter in self._ready_waiters:
                    self._ready_waiters.remove(waiter)

    def _wake_ready_waiters(self) -> None:
        for waiter in self._ready_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._ready_waiters.clear()

    def worker_said(self, worker: Worker, line: str) -> None:
        """A text line on a worker's own socketpair (the only place it is trusted)."""
        if line == "_send_status READY":
            if worker.state is WorkerState.INIT:
                worker.state = WorkerState.READY
                log.info("%s is READY after %.3fs", worker.describe(),
                         time.monotonic() - worker.started_at,
                         extra={"HAPYMASTER_GENERATION": str(worker.generation),
                                "HAPYMASTER_WORKER_PID": str(worker.pid)})
                self._wake_ready_waiters()
        else:
            log.warning("%s sent an unknown status line %r", worker.describe(), line[:80])

    def abandon(self, workers: list[Worker], why: str) -> None:
        """Stop the workers of a generation that failed to start.

        Those already READY may have accepted connections on the shared
        listeners: they are soft-stopped so those finish. The others never
        served anything and are killed.
        """
        for worker in workers:
            if worker in self.processes:
                sig = signal.SIGUSR1 if worker.state is WorkerState.READY else signal.SIGKILL
                worker.state = WorkerState.LEAVING
                self.send_signal(worker, sig, why)

    # --- first start ----------------------------------------------------------

    async def start(self) -> None:
        """Bind, start generation 1 and tell systemd we are READY."""
        self.bind_new_listeners(self.config)
        workers = await self.start_generation(self.config, self.config_text, None)
        self.generation = self.last_generation
        try:
            await self.wait_ready(workers, self.config.global_.ready_timeout)
        except ReloadFailed:
            self.abandon(workers, "first start failed")
            raise
        notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={self.status_line()}")
        log.info("hapymaster %s ready: %d worker(s), config %s", self.version, len(workers),
                 self.config.source)

    def status_line(self) -> str:
        return (f"Ready: generation {self.generation}, {len(self.current_workers())} worker(s), "
                f"{self.reloads} reload(s), {self.failed_reloads} failed")

    # --- reload -----------------------------------------------------------

    def request_reload(self, hard: bool = False) -> asyncio.Future[ReloadResult]:
        """Queue a reload. Requests made while one runs are coalesced into the next one.

        A request that arrives mid-reload may concern a config written after
        the running reload read it, so it cannot share that reload's result:
        it waits for the next one, which all such requests share.
        """
        future: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        if self.stopping:
            future.set_result(ReloadResult(False, ["the master is stopping"]))
            return future
        self._reload_queue.append((hard, future))
        if self._reloader is None or self._reloader.done():
            self._reloader = asyncio.ensure_future(self._run_reloads())
        return future

    async def _run_reloads(self) -> None:
        while self._reload_queue and not self.stopping:
            batch, self._reload_queue = self._reload_queue, []
            hard = any(hard for hard, _ in batch)
            try:
                result = await self._reload_once(hard)
            except Exception as exc:  # a bug must not leave callers hanging
                log.exception("reload crashed")
                result = ReloadResult(False, [f"internal error: {exc!r}"])
            for _, future in batch:
                if not future.done():
                    future.set_result(result)

    async def _reload_once(self, hard: bool) -> ReloadResult:
        kind = "hard reload" if hard else "reload"
        notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
               f"STATUS=Reloading ({kind} #{self.reloads + 1})")
        log.info("%s requested: reading %s", kind, self.config_path or "the embedded config")
        try:
            config, text = self._load_config()
        except ConfigError as exc:
            return self._reload_failed(exc.errors)
        live = list(self.processes)
        for worker in live:
            worker.reloads += 1
        try:
            added = self.bind_new_listeners(config)
        except ReloadFailed as exc:
            self._uncount_reload(live)
            return self._reload_failed([str(exc)])
        state = await self.carried_state()
        try:
            # After an upgrade the new generation must run the new code.
            await self.forkserver.refresh(config.global_.ready_timeout)
            workers = await self.start_generation(config, text, state)
        except (ForkServerError, ReloadFailed) as exc:
            self.close_listeners(added)
            self._uncount_reload(live)
            return self._reload_failed([str(exc), "the previous workers keep serving"])
        try:
            await self.wait_ready(workers, config.global_.ready_timeout)
            if self.stopping:
                raise ReloadFailed("the master is stopping")
        except ReloadFailed as exc:
            self.abandon(workers, "reload failed")
            self.close_listeners(added)
            self._uncount_reload(live)
            return self._reload_failed([str(exc), "the previous workers keep serving"])
        self.config, self.config_text = config, text
        self.generation = workers[0].generation
        self.reloads += 1
        self.close_unused_listeners()
        notify("READY=1", f"STATUS={self.status_line()}")
        self.sigterm_workers_over_max_reloads()
        self.soft_stop_previous_generation(hard)
        messages = [f"{w.describe()} READY in {time.monotonic() - w.started_at:.3f}s"
                    for w in workers]
        log.info("%s #%d done: generation %d READY", kind, self.reloads, self.generation)
        return ReloadResult(True, messages)

    def _uncount_reload(self, workers: list[Worker]) -> None:
        """A failed reload leaves the running workers exactly as they were.

        Counting it would push the serving generation towards max_reloads, and
        the next good reload would then SIGTERM it instead of letting it finish
        its connections.
        """
        for worker in workers:
            worker.reloads -= 1

    def _reload_failed(self, reasons: list[str]) -> ReloadResult:
        self.failed_reloads += 1
        for reason in reasons:
            log.error("reload failed: %s", reason)
        if not self.stopping:  # after STOPPING=1, systemd must not hear READY=1 again
            notify("READY=1", f"STATUS=Reload failed: {reasons[0]}")
        return ReloadResult(False, reasons)

    def sigterm_workers_over_max_reloads(self) -> None:
        """Pass 1: terminate old workers that have lived through too many reloads.

        A worker kept alive by a long connection would otherwise pin an old
        config (and old code) forever. 0 means no limit.
        """
        limit = self.config.global_.max_reloads
        if limit == 0:
            return
        for worker in self.old_workers():
            if worker.reloads > limit:
                worker.state = WorkerState.LEAVING
                self.send_signal(worker, signal.SIGTERM,
                                 f"lived through more than max_reloads={limit} reloads")

    def soft_stop_previous_generation(self, hard: bool) -> None:
        """Pass 2: tell the generation this reload replaced to finish and leave.

        That is every older worker not signalled yet: the previous generation,
        including a replacement started while this reload was running (a
        snapshot taken before would miss it and leave it serving forever).
        A worker already signalled — in pass 1 just now, or in an earlier
        reload — is left alone: one signal per worker per reload, never the
        same signal twice (HAProxy once sent SIGTERM then SIGUSR1 to the same
        worker with max_reloads 1).
        """
        sig = signal.SIGTERM if hard else signal.SIGUSR1
        for worker in self.processes:
            if worker.generation >= self.generation:
                continue
            worker.state = WorkerState.LEAVING
            if not worker.signals_sent:
                self.send_signal(worker, sig, "superseded by generation "
                                 f"{self.generation}" + (" (hard reload)" if hard else ""))

    # --- SIGCHLD --------------------------------------------------------------

    def reap_children(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.child_exited(pid, status)

    def child_exited(self, pid: int, status: int) -> None:
        worker = self.find_worker(pid)
        if worker is None:
            what = "the worker template" if pid == self.forkserver.pid else "child"
            log.info("%s %d exited (%s)", what, pid, describe_status(status))
            return
        self.processes.remove(worker)
        worker.control.close()
        expected = bool(worker.signals_sent) or worker.state is WorkerState.LEAVING
        level = logging.INFO if expected or status == 0 else logging.ERROR
        log.log(level, "%s exited (%s)", worker.describe(), describe_status(status),
                extra={"HAPYMASTER_GENERATION": str(worker.generation),
                       "HAPYMASTER_WORKER_PID": str(pid),
                       "HAPYMASTER_EXIT_STATUS": describe_status(status)})
        self._wake_ready_waiters()
        if self.stopping:
            if not self.processes:
                self._done.set()
            return
        crashed_current = (worker.generation == self.generation and not expected
                           and worker.state is WorkerState.READY)
        if crashed_current:
            asyncio.ensure_future(self.restart_worker(worker))

    async def restart_worker(self, dead: Worker) -> None:
        """Replace a current worker that died, backing off if it keeps dying."""
        delay = self._restart_backoff.get(dead.index, RESTART_BACKOFF_FIRST)
        if time.monotonic() - dead.started_at > RESTART_BACKOFF_RESET_AFTER:
            delay = RESTART_BACKOFF_FIRST
        self._restart_backoff[dead.index] = min(delay * 2, RESTART_BACKOFF_MAX)
        log.warning("restarting worker #%d of generation %d in %.1fs", dead.index,
                    dead.generation, delay)
        await asyncio.sleep(delay)
        if self.stopping or dead.generation != self.generation:
            return
        state = await self.carried_state()
        try:
            worker = await self.spawn_worker(dead.generation, dead.index, self.config,
                                             self.config_text, state)
        except ReloadFailed as exc:  # the worker template is down: try again, backing off
            log.error("cannot restart worker #%d: %s", dead.index, exc)
            dead.started_at = time.monotonic()  # not "up 30 s": keep backing off
            asyncio.ensure_future(self.restart_worker(dead))
            return
        try:
            await self.wait_ready([worker], self.config.global_.ready_timeout)
        except ReloadFailed as exc:
            log.error("replacement for worker #%d failed: %s", dead.index, exc)
            self.abandon([worker], "replacement not READY")
            asyncio.ensure_future(self.restart_worker(worker))

    # --- worker commands ------------------------------------------------------

    async def gather(self, command: str) -> list[str]:
        """Run a command on every READY worker of the current generation."""
        workers = [w for w in self.current_workers() if w.state is WorkerState.READY]
        answers = await asyncio.gather(*(w.control.ask(command) for w in workers),
                                       return_exceptions=True)
        return [a for a in answers if isinstance(a, str)]

    # --- stop -----------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Soft-stop every worker, kill what is left after hard_stop_after, exit."""
        if self.stopping:
            return
        self.stopping = True
        self.forkserver.close()
        notify("STOPPING=1", f"STATUS=Stopping ({why})")
        # New clients must be refused now, not left waiting in a backlog that
        # no worker will ever accept from again.
        self.close_listeners(list(self.listeners))
        log.info("stopping (%s): soft-stopping %d worker(s)", why, len(self.processes))
        for worker in list(self.processes):
            worker.state = WorkerState.LEAVING
            if signal.SIGUSR1 not in worker.signals_sent and \
                    signal.SIGTERM not in worker.signals_sent:
                self.send_signal(worker, signal.SIGUSR1, why)
        for _, future in self._reload_queue:
            if not future.done():
                future.set_result(ReloadResult(False, ["the master is stopping"]))
        self._reload_queue.clear()
        if not self.processes:
            self._done.set()
        asyncio.get_running_loop().call_later(self.config.global_.hard_stop_after,
                                              self._hard_stop)

    def _hard_stop(self) -> None:
        for worker in list(self.processes):
            self.send_signal(worker, signal.SIGKILL,
                             f"still running after hard_stop_after="
                             f"{self.config.global_.hard_stop_after:g}s")

    # --- main loop ------------------------------------------------------------

    async def run(self, serve_cli: Callable[["Master"], Awaitable[asyncio.AbstractServer]]) -> int:
        loop = asyncio.get_running_loop()
        become_subreaper()  # workers forked by the template are our children
        loop.add_signal_handler(signal.SIGCHLD, self.reap_children)
        for sig in (signal.SIGUSR2, signal.SIGHUP):
            loop.add_signal_handler(sig, self.request_reload)
        loop.add_signal_handler(signal.SIGUSR1, self.stop, "SIGUSR1: soft stop")
        loop.add_signal_handler(signal.SIGTERM, self.stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.stop, "SIGINT")
        self._cli_server = await serve_cli(self)
        try:
            await self.start()
        except (ReloadFailed, ConfigError, OSError) as exc:
            log.error("first start failed: %s", exc)
            notify(f"STATUS=Start failed: {exc}")
            self.stopping = True
            await self._wait_children(2.0)
            return 1
        watchdog = watchdog_interval()
        if watchdog:
            loop.create_task(self._watchdog(watchdog))
        await self._done.wait()
        if self._reloader is not None and not self._reloader.done():
            # A reload cut short by the stop must still answer who asked
            # (`hapymaster reload`): with its workers gone it ends at once.
            await asyncio.wait([self._reloader], timeout=2.0)
            await asyncio.sleep(0)  # the CLI connections waiting on it write the answer
        log.info("all workers gone, master exiting")
        return self.exit_code

    async def _wait_children(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.processes and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for worker in list(self.processes):
            self.send_signal(worker, signal.SIGKILL, "master exiting")

    async def _watchdog(self, interval: float) -> None:
        while not self.stopping:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._cli_server is not None:
            self._cli_server.close()
        self.forkserver.close()
        for callback in self.on_stop:
            callback()
        self.close_listeners(list(self.listeners))


def describe_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by {name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def load_function(config_path: str | None, embedded_text: str,
                  embedded_name: str) -> Callable[[], tuple[Config, str]]:
    """How this master (re)reads its config: from the file, or the embedded text."""
    if config_path is None:
        return lambda: (parse_config(embedded_text, embedded_name), embedded_text)
    return lambda: read_config(config_path)
