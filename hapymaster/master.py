"""The master: the process list, starting workers, reloads, signals.

One task owns the process list: the supervisor (``Master.supervise``).
Nothing else changes it. Signal handlers, a worker's READY line, child exits
(reaped in the SIGCHLD handler), CLI reload requests and timers only put an
event on the supervisor's queue (``Master.post``). The supervisor takes one
event, applies it (``_apply``: a named handler per event), then reconciles
what should exist with what does (``_reconcile``: every slot of the current
generation has a worker, else a replacement is started with backoff; a
replacement not READY in time is killed; a stop is done when no worker is
left). That is gunicorn's arbiter loop; here the supervisor awaits nothing
but its next event, so no decision is ever taken on a process list read
before an await. The lifecycle of a worker:

    spawn ──► INIT ──_send_status READY──► READY ──next reload──► LEAVING ──exit──► gone

A worker is in the list from the moment its process exists: it is forked
with its config (parsed by the worker template, once per generation), and
the runtime state it carries over is sent on its socketpair a moment later
by a small task (``_boot``), but its generation and slot are decided, and
visible to the two passes, at once.

A reload, top to bottom, is ``Master.reload_once``, run by the supervisor,
which keeps handling events while the new generation starts: RELOADING=1;
ask a current worker for the runtime state; re-read the config; count the
reload on every live worker; bind the new addresses; start the new
generation (INIT); wait until all of it is READY; then READY=1 and the two
passes, ``sigterm_workers_over_max_reloads`` and
``soft_stop_previous_generation``. Every way a reload can fail (a bad
config, a bind error, EMFILE while starting a worker, a worker exiting or
late, a stop) lands in one ``finally`` that undoes what was done: the new
workers abandoned, the added listeners closed, the reload counts given back,
and READY=1 + ``STATUS=Reload failed`` sent, so RELOADING=1 is never left
unanswered.

A reload asked with ``--upgrade``, or one that finds another version
installed, first re-executes the master in place (``reload_or_reexec``):
the state above crosses the execve (``hapymaster.reexec``), and the new
image, same pid, runs the reload and answers (``adopt``, ``resume``).

The messages on the socketpair are in ``hapymaster.messages``; stats
counters summed across workers and reloads in ``hapymaster.counters``.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import functools
import json
import logging
import os
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

from . import __version__, messages, reexec
from .config import Address, Config, ConfigError, parse_config, read_config
from .counters import CounterBook, Part
from .forkserver import ForkServer, ForkServerError, TemplateGone
from .pdeathsig import become_subreaper
from .sdnotify import (child_environment, extend_timeout, monotonic_usec, notify,
                       watchdog_interval)
from .sockets import FdStore, SocketError, bind_listener, take_passed_sockets

log = logging.getLogger("hapymaster.master")

RESTART_BACKOFF_FIRST = 0.1
RESTART_BACKOFF_MAX = 10.0
# A replacement worker that stays up this long resets the backoff: it was a
# one-off crash, not a crash loop.
RESTART_BACKOFF_RESET_AFTER = 30.0
WORKER_COMMAND_TIMEOUT = 5.0
# A stats scrape must not hang on one stuck worker: its last counters count.
COUNTERS_TIMEOUT = 1.5
# A worker's last counters are on its socketpair when it exits; the channel is
# closed by EOF once they are read. Should another process hold the worker's
# end open, close ours after this long anyway.
CHANNEL_LINGER = 2.0
# Asked of systemd beyond the master's own bound on a first start
# (ready_timeout) or a stop (hard_stop_after): binding, forking and reaping.
EXTEND_TIMEOUT_MARGIN = 10.0


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
    control: "WorkerChannel | None" = None
    state: WorkerState = WorkerState.INIT
    reloads: int = 0
    # A replacement for a current worker that died: the supervisor, not a
    # reload, kills it when it is late.
    ready_deadline: float | None = None
    # Every signal the master ever sent this worker: the guard that keeps a
    # worker from getting the same signal twice, or two signals in one reload.
    signals_sent: list[signal.Signals] = field(default_factory=list)

    def describe(self) -> str:
        return f"worker {self.pid} (generation {self.generation}, #{self.index})"

    async def ask(self, command: str, timeout: float = WORKER_COMMAND_TIMEOUT) -> str:
        """Run a worker CLI command and return its answer."""
        if self.control is None:
            raise ConnectionError("worker is not connected yet")
        return str(await self.control.request(messages.CLI, timeout, command=command))


@dataclass
class ReloadResult:
    success: bool
    messages: list[str]

    def render(self) -> str:
        lines = [f"Success={int(self.success)}", "--", *self.messages]
        return "\n".join(lines) + "\n"


class ReloadFailed(Exception):
    def __init__(self, *reasons: str):
        super().__init__(reasons[0])
        self.reasons = list(reasons)


# --- the supervisor's events ------------------------------------------------------

@dataclass
class ChildExited:
    pid: int
    status: int


@dataclass
class WorkerSaid:
    worker: Worker
    line: str


@dataclass
class ReloadAsked:
    hard: bool
    future: "asyncio.Future[ReloadResult] | None"
    # ``reload --upgrade``: re-execute the master first (see ``reexec_in_place``).
    upgrade: bool = False
    # The CLI client waiting for the answer: carried across a re-exec, so the
    # answer comes from the new image.
    client: Any = None    # the CLI connection (anything with fileno())


@dataclass
class StopAsked:
    why: str


@dataclass
class HardStopDue:
    pass


@dataclass
class Wake:
    """A timer is due (restart backoff, a deadline): reconcile again."""
    why: str


Event = ChildExited | WorkerSaid | ReloadAsked | StopAsked | HardStopDue | Wake


class CliEndpoint(Protocol):
    """What the master needs of its CLI server (``hapymaster.mcli.CliServer``)."""

    def fileno(self) -> int: ...
    async def quiesce(self, timeout: float) -> bool: ...
    async def resume(self) -> None: ...
    def close(self) -> None: ...


class WorkerChannel(messages.Channel):
    """The master's end of one worker's socketpair.

    This is the only place where ``_send_status`` is believed: the socketpair
    was created by the master for this worker alone, so whoever writes here
    is that worker. The line goes to the supervisor as an event.
    """

    def __init__(self, master: "Master", worker: Worker, leftover: bytes = b""):
        super().__init__(leftover)
        self.master = master
        self.worker = worker
        # Done at EOF: everything the worker wrote, its last counters too, is read.
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def text_received(self, line: str) -> None:
        self.master.post(WorkerSaid(self.worker, line))

    def message_received(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == messages.GATHER:
            asyncio.ensure_future(self._answer_gather(message))
        elif kind == messages.FINAL:
            self.master.counters.seen(self.worker.pid, message.get("counters"))
        else:
            super().message_received(message)

    async def _answer_gather(self, message: dict[str, Any]) -> None:
        """``gather _counters``: one part, already the sum of every worker ever."""
        outputs = []
        if message.get("command") == "_counters":
            outputs.append(json.dumps(await self.master.counter_totals(), separators=(",", ":")))
        else:
            log.warning("%s asked to gather %r: only _counters is gathered",
                        self.worker.describe(), str(message.get("command"))[:80])
        self.reply(message, outputs)

    def closed(self) -> None:
        self.master.counters.retire(self.worker.pid)
        if not self.gone.done():
            self.gone.set_result(None)


class Master:
    def __init__(self, config: Config, config_text: str, config_path: str | None,
                 socket_path: str, load: Callable[[], tuple[Config, str]]):
        self.config = config
        self.config_text = config_text
        self.config_path = config_path
        self.socket_path = socket_path
        self._load_config = load
        self.processes: list[Worker] = []
        self.exited: list[Worker] = []     # reaped, their channel not read to the end yet
        self.listeners: dict[Address, socket.socket] = {}
        self.fdstore = FdStore.from_environment()
        self._passed_taken = False     # systemd's LISTEN_FDS are taken by the first bind
        self.generation = 0            # the current generation (last that became READY)
        self.last_generation = 0       # the newest generation started, READY or not
        self.reloads = 0               # successful reloads
        self.failed_reloads = 0
        self.started_at = time.monotonic()
        self.version = __version__
        self.stopping = False
        self.exit_code = 0
        self.counters = CounterBook()
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._reload_queue: list[tuple[bool, asyncio.Future[ReloadResult] | None]] = []
        self._start_failed: str | None = None   # set while the first start runs
        self._starting = True
        self._restart_at: dict[int, float] = {}        # slot -> when its replacement starts
        self._restart_backoff: dict[int, float] = {}   # slot -> next delay
        self._last_state: Any = None
        self._cli_server: CliEndpoint | None = None
        self.on_stop: list[Callable[[], None]] = []
        self.forkserver = ForkServer()  # the worker template every worker is forked from
        # Re-exec in place: the version this image started with (a reload that
        # finds another one installed re-executes), what the previous image
        # handed over, and who waits for an answer.
        self.image_version = self.forkserver.image[0]
        self.carried: reexec.Carried | None = None
        self.cli_fd: int | None = None       # the master CLI's carried listening socket
        self._upgrade_asked = False
        self._reload_clients: dict[asyncio.Future[ReloadResult], Any] = {}
        self._awaited_children: dict[int, asyncio.Future[int]] = {}
        # What cli.run_master needs back after a re-exec (the demo origins' pid,
        # the embedded config's scratch directory): Carried's fields of those names.
        self.carry_extra: dict[str, Any] = {}

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
        client connecting during a reload is ever refused. The first call
        takes the sockets systemd passed (socket unit, fd store) before
        binding the rest; a socket this master binds goes to the fd store.
        """
        added: list[Address] = []
        try:
            if not self._passed_taken:
                # Not in ``added``: a start that fails must leave systemd's
                # sockets in its store for the next master.
                self._passed_taken = True
                self.listeners.update(take_passed_sockets(config, self.fdstore))
            for address in self.wanted_addresses(config):
                if address not in self.listeners:
                    self.listeners[address] = bind_listener(address)
                    added.append(address)
                    self.fdstore.keep(address, self.listeners[address])
        except SocketError as exc:
            raise ReloadFailed(*exc.errors) from None
        except OSError as exc:
            self.close_listeners(added)
            raise ReloadFailed(f"{config.source}: cannot bind {address}: {exc.strerror}") from None
        return added

    def close_listeners(self, addresses: list[Address]) -> None:
        """Close listeners this master is done with, in the fd store too."""
        for address in addresses:
            sock = self.listeners.pop(address, None)
            if sock is not None:
                sock.close()
            self.fdstore.forget(address)

    def release_listeners(self) -> None:
        """Close this master's copy of every listener, and keep the fd store's.

        With the store, systemd still holds each socket: clients wait in the
        backlog for the next master (a restart, or after a crash). Without
        it, or once systemd empties the store on a real stop, they are refused.
        """
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()

    def close_unused_listeners(self) -> None:
        wanted = set(self.wanted_addresses(self.config))
        self.close_listeners([a for a in self.listeners if a not in wanted])

    # --- starting workers -----------------------------------------------------

    def _start_processes(self, controls: list[socket.socket], listener_fds: list[int],
                         generation: int, indexes: list[int], config: Config,
                         text: str) -> list[int]:
        """Create the OS processes of workers and return their pids.

        Each worker gets its control socket (its end of the socketpair) and
        the listening sockets; it reads its boot message on the control
        socket. This is the only place that knows how a worker process comes
        to exist: forked by the worker template (``hapymaster.forkserver``),
        which must be running (``_template_ready``), all of one request in
        one go. Raises ForkServerError (TemplateGone: it died) or OSError.
        """
        return self.forkserver.spawn(controls, listener_fds, os.getpid(), generation, indexes,
                                     config, text)

    async def _template_ready(self, timeout: float, refresh: bool) -> None:
        """Have a worker template running (``refresh``: one of the code on disk now).

        Awaited while the supervisor goes on handling events.
        """
        prepare = self.forkserver.refresh if refresh else self.forkserver.ensure
        task = asyncio.ensure_future(prepare(timeout))
        task.add_done_callback(lambda _: self.post(Wake("worker template")))
        if not await self._until(task.done, time.monotonic() + timeout + 1.0):
            task.cancel()
            raise ForkServerError(f"the worker template was not ready within {timeout:g}s")
        task.result()

    def spawn_workers(self, generation: int, indexes: list[int], config: Config, text: str,
                      state: "asyncio.Future[Any]") -> list[Worker]:
        """Start the workers of these slots, in the process list (INIT) when this returns.

        Raises OSError when the processes cannot be made (EMFILE, EAGAIN...),
        ForkServerError when the worker template cannot fork them; then none
        was started.
        """
        wanted = set(self.wanted_addresses(config))
        listeners = [(str(address), sock.fileno()) for address, sock in self.listeners.items()
                     if address in wanted]
        pairs: list[tuple[socket.socket, socket.socket]] = []
        started_at = time.monotonic()  # "READY in" counts the fork too
        try:
            for _ in indexes:
                pairs.append(socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM))
            pids = self._start_processes([child for _, child in pairs],
                                         [fd for _, fd in listeners], generation, indexes,
                                         config, text)
        except BaseException:
            for parent_end, _ in pairs:
                parent_end.close()
            raise
        finally:
            for _, child_end in pairs:
                child_end.close()
        workers = []
        for index, pid, (parent_end, _) in zip(indexes, pids, pairs):
            worker = Worker(pid=pid, generation=generation, index=index,
                            version=self.forkserver.version, started_at=started_at)
            self.processes.append(worker)
            workers.append(worker)
            log.info("started %s", worker.describe(),
                     extra={"HAPYMASTER_GENERATION": str(generation),
                            "HAPYMASTER_WORKER_PID": str(pid)})
            # No config text: the template parsed it for its workers.
            boot = functools.partial(messages.boot, generation=generation, index=index,
                                     master_pid=os.getpid(), config_path=config.source,
                                     config_text=None, listeners=listeners)
            asyncio.ensure_future(self._boot(worker, parent_end, boot, state))
        return workers

    async def _boot(self, worker: Worker, sock: socket.socket,
                    boot: Callable[..., dict[str, Any]], state: "asyncio.Future[Any]") -> None:
        """Connect the master's end of the socketpair, then send the boot message.

        Only data is awaited here; the worker's place in the process list
        was decided before. A worker that never gets its boot message is not
        READY in time, and fails like any late worker.
        """
        loop = asyncio.get_running_loop()
        try:
            _, channel = await loop.create_unix_connection(
                lambda: WorkerChannel(self, worker), sock=sock)
        except OSError as exc:
            sock.close()
            log.error("cannot talk to %s: %s", worker.describe(), exc)
            return
        worker.control = channel
        channel.send(boot(state=await state))

    def read_state(self) -> "asyncio.Future[Any]":
        """Runtime state (weights, admin and health states) of a current worker.

        Handed to the next worker or generation, so what an operator set at
        runtime and what the health checks found survive a reload.
        """
        async def read() -> Any:
            for worker in self.current_workers():
                if worker.state is WorkerState.READY:
                    try:
                        self._last_state = json.loads(await worker.ask("_state"))
                        break
                    except (ConnectionError, asyncio.TimeoutError, ValueError) as exc:
                        log.warning("could not read the runtime state of %s: %s",
                                    worker.describe(), exc)
            return self._last_state
        return asyncio.ensure_future(read())

    async def start_generation(self, config: Config, text: str,
                               state: "asyncio.Future[Any]") -> list[Worker]:
        """Start the next generation, INIT. If one worker cannot be started, none is.

        A template that died since it was last looked at (killed, OOM) is
        found only when asked to fork: then a new one is started and asked
        once more, instead of failing the reload.
        """
        self.last_generation += 1
        indexes = list(range(1, config.global_.workers + 1))
        timeout = config.global_.ready_timeout
        try:
            try:
                return self.spawn_workers(self.last_generation, indexes, config, text, state)
            except TemplateGone as exc:
                log.warning("%s: starting a new one for generation %d", exc, self.last_generation)
                await self._template_ready(timeout, refresh=True)
                return self.spawn_workers(self.last_generation, indexes, config, text, state)
        except (OSError, ForkServerError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ReloadFailed(f"cannot start the workers of generation {self.last_generation}: "
                               f"{reason}", "the previous workers keep serving") from None

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

    # --- the supervisor -------------------------------------------------------------

    def post(self, event: Event) -> None:
        """Hand an event to the supervisor: the only thing handlers and callbacks do."""
        self._events.put_nowait(event)

    async def supervise(self) -> int:
        """The one task that owns the process list: first start, then events and reloads."""
        try:
            await (self.resume() if self.carried is not None else self.first_start())
        except (ReloadFailed, ForkServerError, OSError) as exc:
            log.error("first start failed: %s", exc)
            notify(f"STATUS=Start failed: {exc}")
            self.stopping = True
            self.abandon(list(self.processes), "first start failed")
            await self._until(lambda: not self.processes, time.monotonic() + 2.0)
            for worker in list(self.processes):
                self.send_signal(worker, signal.SIGKILL, "master exiting")
            return 1
        while not (self.stopping and not self.processes):
            if self._reload_queue and not self.stopping:
                batch, self._reload_queue = self._reload_queue, []
                hard = any(hard for hard, _ in batch)
                try:
                    result = await self.reload_or_reexec(hard)
                except Exception as exc:  # a bug must not leave callers hanging
                    log.exception("reload crashed")
                    result = ReloadResult(False, [f"internal error: {exc!r}"])
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(result)
                continue
            await self._next_event()
        log.info("all workers gone, master exiting")
        return self.exit_code

    async def _next_event(self) -> None:
        event = await self._events.get()
        self._apply(event)
        self._reconcile()

    async def _until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Handle events until ``done()``; False if ``deadline`` came first."""
        wake = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()) + 0.005, self.post, Wake("deadline"))
        try:
            while not done():
                if time.monotonic() >= deadline:
                    return False
                await self._next_event()
            return True
        finally:
            wake.cancel()

    def _apply(self, event: Event) -> None:
        if isinstance(event, ChildExited):
            self.child_exited(event.pid, event.status)
        elif isinstance(event, WorkerSaid):
            self.worker_said(event.worker, event.line)
        elif isinstance(event, ReloadAsked):
            if self.stopping:
                if event.future is not None and not event.future.done():
                    event.future.set_result(ReloadResult(False, ["the master is stopping"]))
            else:
                self._reload_asked(event)
                self._reload_queue.append((event.hard, event.future))
        elif isinstance(event, StopAsked):
            self.stop(event.why)
        elif isinstance(event, HardStopDue):
            self._hard_stop()

    def _reconcile(self) -> None:
        """What should exist against what does: the current generation's slots."""
        # Generation 0: the first one is not started yet, there is nothing to restart.
        if self.stopping or self._start_failed or self.generation == 0:
            return
        now = time.monotonic()
        current = {w.index: w for w in self.current_workers()}
        for index in range(1, self.config.global_.workers + 1):
            worker = current.get(index)
            if worker is None:
                due = self._restart_at.get(index)
                if due is None:
                    self._schedule_restart(index)
                elif now >= due:
                    del self._restart_at[index]
                    self._restart(index)
            elif worker.state is WorkerState.INIT and worker.ready_deadline is not None \
                    and now >= worker.ready_deadline:
                log.error("replacement %s was not READY within %gs", worker.describe(),
                          self.config.global_.ready_timeout)
                self.abandon([worker], "replacement not READY")
                self._schedule_restart(index)

    def _schedule_restart(self, index: int) -> None:
        delay = self._restart_backoff.get(index, RESTART_BACKOFF_FIRST)
        self._restart_backoff[index] = min(delay * 2, RESTART_BACKOFF_MAX)
        self._restart_at[index] = time.monotonic() + delay
        log.warning("restarting worker #%d of generation %d in %.1fs", index, self.generation,
                    delay)
        asyncio.get_running_loop().call_later(delay, self.post, Wake("restart"))

    def _restart(self, index: int) -> None:
        """Replace a current worker that died (its slot is empty)."""
        if not self.forkserver.running():
            # The template died: start the next one meanwhile, try again after the backoff.
            self._start_template(f"cannot restart worker #{index}")
            self._schedule_restart(index)
            return
        try:
            worker = self.spawn_workers(self.generation, [index], self.config, self.config_text,
                                        self.read_state())[0]
        except (OSError, ForkServerError) as exc:
            log.error("cannot restart worker #%d: %s", index, exc)
            self._start_template(f"cannot restart worker #{index}")
            self._schedule_restart(index)
            return
        timeout = self.config.global_.ready_timeout
        worker.ready_deadline = worker.started_at + timeout
        asyncio.get_running_loop().call_later(timeout + 0.005, self.post, Wake("ready deadline"))

    def _start_template(self, why: str) -> None:
        """Start a worker template in the background; ``why`` says what waits for it."""
        def done(task: "asyncio.Future[None]") -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("%s: %s", why, task.exception())
            self.post(Wake("worker template"))
        task = asyncio.ensure_future(self.forkserver.ensure(self.config.global_.ready_timeout))
        task.add_done_callback(done)

    # --- events --------------------------------------------------------------------

    def worker_said(self, worker: Worker, line: str) -> None:
        """A text line on a worker's own socketpair (the only place it is trusted)."""
        if line == messages.READY_LINE:
            if worker.state is WorkerState.INIT:
                worker.state = WorkerState.READY
                log.info("%s is READY after %.3fs", worker.describe(),
                         time.monotonic() - worker.started_at,
                         extra={"HAPYMASTER_GENERATION": str(worker.generation),
                                "HAPYMASTER_WORKER_PID": str(worker.pid)})
        else:
            log.warning("%s sent an unknown status line %r", worker.describe(), line[:80])

    def reap_children(self) -> None:
        """SIGCHLD: reap every child that exited and tell the supervisor."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.post(ChildExited(pid, status))

    def child_exited(self, pid: int, status: int) -> None:
        awaited = self._awaited_children.pop(pid, None)
        if awaited is not None:
            if not awaited.done():
                awaited.set_result(status)
            return
        worker = self.find_worker(pid)
        if worker is None:
            what = "the worker template" if pid == self.forkserver.pid else "child"
            log.info("%s %d exited (%s)", what, pid, describe_status(status))
            return
        self.processes.remove(worker)
        if worker.control is not None and not worker.control.gone.done():
            # Not closed now: its last counters may still be unread on it.
            self.exited.append(worker)
            asyncio.get_running_loop().call_later(CHANNEL_LINGER, self._forget, worker)
        expected = bool(worker.signals_sent) or worker.state is WorkerState.LEAVING
        level = logging.INFO if expected or status == 0 else logging.ERROR
        log.log(level, "%s exited (%s)", worker.describe(), describe_status(status),
                extra={"HAPYMASTER_GENERATION": str(worker.generation),
                       "HAPYMASTER_WORKER_PID": str(pid),
                       "HAPYMASTER_EXIT_STATUS": describe_status(status)})
        if self._starting and worker.state is WorkerState.INIT and not self.stopping:
            self._start_failed = f"{worker.describe()} exited before it was READY"
        if worker.generation == self.generation and \
                time.monotonic() - worker.started_at > RESTART_BACKOFF_RESET_AFTER:
            self._restart_backoff.pop(worker.index, None)

    def _forget(self, worker: Worker) -> None:
        self.exited.remove(worker)
        if worker.control is not None:
            worker.control.close()

    # --- first start ----------------------------------------------------------

    async def first_start(self) -> None:
        """Bind, start generation 1 and tell systemd we are READY.

        Generation 1 is current from the start: a worker that was READY and
        dies while another is still INIT is restarted like any current
        worker. The start fails only if a worker exits before it was READY,
        or one is not READY within ready_timeout.
        """
        self.bind_new_listeners(self.config)
        await self._template_ready(self.config.global_.ready_timeout, refresh=False)
        workers = await self.start_generation(self.config, self.config_text, self.read_state())
        self.generation = self.last_generation
        timeout = self.config.global_.ready_timeout

        def all_ready() -> bool:
            ready = [w for w in self.current_workers() if w.state is WorkerState.READY]
            return len(ready) == self.config.global_.workers

        done = await self._until(lambda: bool(self.stopping or self._start_failed or all_ready()),
                                 time.monotonic() + timeout)
        if self._start_failed:
            raise ReloadFailed(self._start_failed)
        if not done:
            late = [w for w in self.current_workers() if w.state is WorkerState.INIT]
            raise ReloadFailed(f"{(late or workers)[0].describe()} was not READY within "
                               f"{timeout:g}s")
        self._starting = False
        if self.stopping:
            return
        notify("READY=1", f"MAINPID={os.getpid()}", f"STATUS={self.status_line()}")
        log.info("hapymaster %s ready: %d worker(s), config %s", self.version, len(workers),
                 self.config.source)

    def status_line(self) -> str:
        return (f"Ready: generation {self.generation}, {len(self.current_workers())} worker(s), "
                f"{self.reloads} reload(s), {self.failed_reloads} failed")

    # --- reload -----------------------------------------------------------

    def request_reload(self, hard: bool = False, upgrade: bool = False,
                       client: Any = None) -> asyncio.Future[ReloadResult]:
        """Ask for a reload; the answer comes when the new generation is READY or failed.

        Requests made while one runs are coalesced into the next one: a
        request that arrives mid-reload may concern a config written after
        the running reload read it, so it cannot share that reload's result.
        """
        future: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self.post(ReloadAsked(hard, future, upgrade, client))
        return future

    async def reload_once(self, hard: bool) -> ReloadResult:
        kind = "hard reload" if hard else "reload"
        notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
               f"STATUS=Reloading ({kind} #{self.reloads + 1})")
        log.info("%s requested: reading %s", kind, self.config_path or "the embedded config")
        # Asked first: a busy worker of the current generation answers while
        # the config is read and the new workers are forked and built; they
        # need it only when their boot message comes, just before READY.
        state = self.read_state()
        counted: list[Worker] = []
        added: list[Address] = []
        workers: list[Worker] = []
        reasons = ["internal error (see the master's log)"]
        ready = False
        failed: ReloadResult | None = None
        try:
            config, text = self._load_config()
            counted = self.count_reload()
            added = self.bind_new_listeners(config)
            # After an upgrade the new generation must run the new code.
            await self._template_ready(config.global_.ready_timeout, refresh=True)
            workers = await self.start_generation(config, text, state)
            await self._until(lambda: self.stopping or self._settled(workers),
                              time.monotonic() + config.global_.ready_timeout)
            self.check_ready(workers, config.global_.ready_timeout)
            ready = True
        except ConfigError as exc:
            reasons = list(exc.errors)
        except ReloadFailed as exc:
            reasons = exc.reasons
        except ForkServerError as exc:
            reasons = [str(exc), "the previous workers keep serving"]
        finally:
            if not ready:
                self.abandon(workers, "reload failed")
                self.close_listeners(added)
                self._uncount_reload(counted)
                failed = self._reload_failed(reasons)
        if failed is not None:
            return failed
        return self._reload_done(kind, config, text, workers, hard)

    def count_reload(self) -> list[Worker]:
        """Every live worker lives through one more reload (given back if it fails)."""
        live = list(self.processes)
        for worker in live:
            worker.reloads += 1
        return live

    def _settled(self, workers: list[Worker]) -> bool:
        """Every worker READY, or one gone: either way the reload is decided."""
        return any(w not in self.processes for w in workers) or \
            all(w.state is WorkerState.READY for w in workers)

    def check_ready(self, workers: list[Worker], timeout: float) -> None:
        if self.stopping:
            raise ReloadFailed("the master is stopping")
        dead = [w for w in workers if w not in self.processes]
        if dead:
            raise ReloadFailed(f"{dead[0].describe()} exited before it was READY",
                               "the previous workers keep serving")
        late = [w for w in workers if w.state is not WorkerState.READY]
        if late:
            raise ReloadFailed(f"{late[0].describe()} was not READY within {timeout:g}s",
                               "the previous workers keep serving")

    def _reload_done(self, kind: str, config: Config, text: str, workers: list[Worker],
                     hard: bool) -> ReloadResult:
        self.config, self.config_text = config, text
        self.generation = workers[0].generation
        self.reloads += 1
        # The new generation's slots are all filled; restarts planned for the
        # old one are void.
        self._restart_at.clear()
        self._restart_backoff.clear()
        self.close_unused_listeners()
        notify("READY=1", f"STATUS={self.status_line()}")
        self.sigterm_workers_over_max_reloads()
        self.soft_stop_previous_generation(hard)
        log.info("%s #%d done: generation %d READY", kind, self.reloads, self.generation)
        return ReloadResult(True, [f"{w.describe()} READY in "
                                   f"{time.monotonic() - w.started_at:.3f}s" for w in workers])

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

    # --- re-exec in place (hapymaster.reexec) ---------------------------------

    def _reload_asked(self, event: ReloadAsked) -> None:
        """Note what a re-exec would have to carry for this request."""
        if event.upgrade:
            self._upgrade_asked = True
        if event.client is not None and event.future is not None:
            self._reload_clients[event.future] = event.client
            event.future.add_done_callback(lambda done: self._reload_clients.pop(done, None))

    def upgrade_reason(self) -> str | None:
        """Why the next reload re-executes the master first; None when it does not."""
        if self._upgrade_asked:
            return "reload --upgrade"
        installed = self.forkserver.code.installed_version()
        if installed != self.image_version:
            return f"the installed version changed ({self.image_version} -> {installed})"
        return None

    async def reload_or_reexec(self, hard: bool) -> ReloadResult:
        """A reload; re-executing the master first when asked or upgraded.

        A re-exec that works never returns: the new image runs the reload and
        answers. One that cannot work fails this reload, and nothing changed.
        """
        why = self.upgrade_reason()
        self._upgrade_asked = False
        if why is None:
            return await self.reload_once(hard)
        return await self.reexec_in_place(hard, why)

    async def reexec_in_place(self, hard: bool, why: str) -> ReloadResult:
        notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
               f"STATUS=Re-executing the master ({why})")
        log.info("re-executing the master in place (%s): checking the code on disk", why)
        await self._settle_channels()
        reasons = await self._preflight(self.carry(hard))
        if not reasons and not self.stopping:
            reasons = await self._exec_in_place(hard)
        return self._reload_failed([f"re-exec failed: {reasons[0]}", *reasons[1:],
                                    f"the master keeps running {self.version}, the previous "
                                    f"workers keep serving"])

    async def _exec_in_place(self, hard: bool) -> list[str]:
        """Quiesce, carry, execve: returns only when the execve failed, with why."""
        cli = self._cli_server
        assert cli is not None
        # The CLI stops accepting (clients wait in its backlog for the new
        # image) and the commands in progress answer; reloads asked meanwhile
        # are queued, and carried.
        if not await self._handling_events(cli.quiesce(CHANNEL_LINGER), CHANNEL_LINGER + 1.0):
            log.warning("re-exec: a master CLI command is still running; its client loses "
                        "its connection")
        await self._settle_channels()
        if self.stopping:   # a stop came meanwhile: this image does it
            await cli.resume()
            return ["the master is stopping"]
        # Built after the last await, then straight to the execve: what the new
        # image gets is the process list of this very moment.
        carried = self.carry(hard)
        log.info("re-exec: %d worker(s), %d waiting client(s), %d listener(s) carried: execve %s",
                 len(carried.workers), len(carried.reloads_pending[0].client_fds),
                 len(carried.listeners), " ".join(reexec.exec_command()))
        try:
            state_fd = reexec.write_state(carried)
            try:
                reexec.exec_master(carried.fds(), state_fd)
            finally:
                os.close(state_fd)   # reached only when the execve failed
        except OSError as exc:
            reasons = [f"cannot re-execute the master: {exc}"]
        await cli.resume()
        return reasons

    async def _handling_events(self, work: Awaitable[Any], timeout: float) -> Any:
        """Await ``work`` while the supervisor goes on handling events; None if late."""
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: self.post(Wake("re-exec step")))
        if not await self._until(task.done, time.monotonic() + timeout):
            task.cancel()
            return None
        return task.result()

    async def _settle_channels(self) -> None:
        """Let every channel reach a boundary the new image can start from.

        A worker's boot message fully written, the last counters of a worker
        just reaped read. Bounded: a stuck channel does not hold the upgrade.
        """
        def written(channel: WorkerChannel | None) -> bool:
            if channel is None:
                return False     # its boot message is not even sent yet
            return channel.transport is None or not channel.transport.get_write_buffer_size()

        def settled() -> bool:
            return all(written(w.control) for w in self.processes) and \
                all(w.control is None or w.control.gone.done() for w in self.exited)
        if not await self._until(settled, time.monotonic() + CHANNEL_LINGER):
            log.warning("re-exec: a worker channel is still busy, carrying it as it is")

    def carry(self, hard: bool) -> reexec.Carried:
        """This master's state for its next image (hapymaster.reexec.Carried)."""
        workers = []
        for worker in self.processes:
            channel = worker.control
            sock = channel.transport.get_extra_info("socket") \
                if channel is not None and channel.transport is not None else None
            workers.append(reexec.CarriedWorker(
                pid=worker.pid, generation=worker.generation, index=worker.index,
                version=worker.version, started_at=worker.started_at,
                state=worker.state.value, reloads=worker.reloads,
                signals_sent=[sig.name for sig in worker.signals_sent],
                control_fd=sock.fileno() if sock is not None else -1,
                ready_deadline=worker.ready_deadline,
                unread=base64.b64encode(channel.unread()).decode() if channel else ""))
        # The reload asked now and every one asked since (the new image reads
        # the config after all of them came): one reload, every client answered.
        hard = hard or any(queued_hard for queued_hard, _ in self._reload_queue)
        clients = [fd for fd in (c.fileno() for c in self._reload_clients.values()) if fd >= 0]
        assert self._cli_server is not None
        return reexec.Carried(
            version=self.version, started_at=self.started_at, generation=self.generation,
            last_generation=self.last_generation, reloads=self.reloads,
            failed_reloads=self.failed_reloads, config_path=self.config_path,
            config_text=self.config_text, config_source=self.config.source,
            socket_path=self.socket_path, cli_fd=self._cli_server.fileno(),
            listeners={str(a): s.fileno() for a, s in self.listeners.items()},
            fdstore_names={str(a): n for a, n in self.fdstore.names.items()},
            workers=workers, counters_retired=self.counters.retired,
            counters_last={str(pid): part for pid, part in self.counters.last.items()},
            runtime_state=self._last_state,
            restart_at={str(k): v for k, v in self._restart_at.items()},
            restart_backoff={str(k): v for k, v in self._restart_backoff.items()},
            reloads_pending=[reexec.CarriedReload(hard, clients)],
            **self.carry_extra)

    async def _preflight(self, carried: reexec.Carried) -> list[str]:
        """Run the new code's check (``python -m hapymaster.reexec check``); its errors."""
        timeout = self.config.global_.ready_timeout
        with tempfile.TemporaryFile() as state, tempfile.TemporaryFile() as output:
            state.write(carried.to_json().encode())
            state.seek(0)
            try:
                process = subprocess.Popen(reexec.preflight_command(self.config_path),
                                           stdin=state, stdout=output, stderr=subprocess.STDOUT,
                                           env=child_environment())
            except OSError as exc:
                return [f"cannot run the new code's check: {exc}"]
            # Reaped by reap_children like every child; its status comes back here.
            process.returncode = 0
            exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._awaited_children[process.pid] = exited
            if not await self._until(exited.done, time.monotonic() + timeout):
                os.kill(process.pid, signal.SIGKILL)   # not reaped yet: it never exited
                return [f"the new code's check did not finish within {timeout:g}s"]
            output.seek(0)
            lines = [line for line in output.read().decode("utf-8", "replace").splitlines()
                     if line.strip()]
        status = exited.result()
        if status == 0:
            return []
        return lines[-20:] or [f"the new code's check failed ({describe_status(status)})"]

    def adopt(self, carried: reexec.Carried) -> None:
        """In the new image: start from what the previous one handed over.

        ``self.config`` is the config the running workers were started with
        (parsed from the carried text); the reload that follows reads the disk.
        """
        self.carried = carried
        self.started_at = carried.started_at
        self.generation, self.last_generation = carried.generation, carried.last_generation
        self.reloads, self.failed_reloads = carried.reloads, carried.failed_reloads
        self.cli_fd = carried.cli_fd
        self._passed_taken = True     # systemd's sockets were taken by the first image
        self._starting = False
        # The carried config is the one the listeners were bound for: each has its bind.
        by_text = {str(a): a for a in self.wanted_addresses(self.config)}
        for text, fd in carried.listeners.items():
            sock = socket.socket(fileno=fd)
            sock.setblocking(False)
            if text in by_text:
                self.listeners[by_text[text]] = sock
            else:
                log.error("re-exec: the carried socket of %s matches no bind; closing it", text)
                sock.close()
        self.fdstore.names = {by_text[text]: name for text, name
                              in carried.fdstore_names.items() if text in by_text}
        for item in carried.workers:
            self.processes.append(Worker(
                pid=item.pid, generation=item.generation, index=item.index,
                version=item.version, started_at=item.started_at,
                state=WorkerState(item.state), reloads=item.reloads,
                ready_deadline=item.ready_deadline,
                signals_sent=[signal.Signals[name] for name in item.signals_sent]))
        live = {w.pid for w in carried.workers}
        self.counters.retired = carried.counters_retired
        self.counters.last = {int(pid): part for pid, part in carried.counters_last.items()}
        for pid in [p for p in self.counters.last if p not in live]:
            self.counters.retire(pid)   # reaped before the exec, its channel not read to the end
        self._last_state = carried.runtime_state
        self._restart_at = {int(k): v for k, v in carried.restart_at.items()}
        self._restart_backoff = {int(k): v for k, v in carried.restart_backoff.items()}

    async def resume(self) -> None:
        """The new image's start: reconnect the workers, queue the carried reloads."""
        carried = self.carried
        assert carried is not None
        loop = asyncio.get_running_loop()
        for worker, item in zip(list(self.processes), carried.workers):
            if item.control_fd < 0:
                continue
            sock = socket.socket(fileno=item.control_fd)
            _, channel = await loop.create_unix_connection(
                functools.partial(WorkerChannel, self, worker, item.unread_bytes()), sock=sock)
            worker.control = channel
        for reload in carried.reloads_pending:
            future: asyncio.Future[ReloadResult] = loop.create_future()
            clients = [socket.socket(fileno=fd) for fd in reload.client_fds]
            future.add_done_callback(functools.partial(self._answer_carried, clients))
            self._reload_queue.append((reload.hard, future))
        now = time.monotonic()
        for due in [*self._restart_at.values(),
                    *(w.ready_deadline for w in self.processes if w.ready_deadline)]:
            loop.call_later(max(0.0, due - now) + 0.005, self.post, Wake("carried timer"))
        log.info("re-executed in place: hapymaster %s took over from %s (pid %d, %d "
                 "process(es), generation %d)", self.version, carried.version, os.getpid(),
                 len(self.processes), self.generation)

    def _answer_carried(self, clients: list[socket.socket],
                        future: "asyncio.Future[ReloadResult]") -> None:
        """A reload asked of the previous image is answered by this one."""
        answer = future.result().render().encode() if not future.cancelled() else b""

        async def send(sock: socket.socket) -> None:
            try:
                sock.setblocking(False)
                await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(sock, answer),
                                       WORKER_COMMAND_TIMEOUT)
            except (OSError, asyncio.TimeoutError) as exc:
                log.warning("could not answer a reload client: %s", exc)
            finally:
                sock.close()
        for sock in clients:
            asyncio.ensure_future(send(sock))

    # --- worker commands ------------------------------------------------------

    async def counter_totals(self) -> Part:
        """Stats counters of everything served since the master started.

        Every live worker that served is asked: the current generation and
        the old ones still finishing their connections.
        """
        # A worker just reaped may have its last counters still unread on its
        # channel: wait for them, or they would be missing from this answer.
        lingering = [w.control.gone for w in self.exited if w.control is not None
                     and not w.control.gone.done()]
        if lingering:
            await asyncio.wait(lingering, timeout=COUNTERS_TIMEOUT)
        workers = [w for w in self.processes if w.state is not WorkerState.INIT
                   and w.control is not None]
        answers = await asyncio.gather(*(w.ask("_counters", COUNTERS_TIMEOUT) for w in workers),
                                       return_exceptions=True)
        fresh: dict[int, Part] = {}
        for worker, answer in zip(workers, answers):
            if isinstance(answer, str):
                try:
                    fresh[worker.pid] = json.loads(answer)
                except ValueError:
                    continue
        return self.counters.totals(fresh)

    # --- stop -----------------------------------------------------------------

    def stop(self, why: str) -> None:
        """Soft-stop every worker, kill what is left after hard_stop_after, exit."""
        if self.stopping:
            return
        self.stopping = True
        self.forkserver.close()
        notify("STOPPING=1", f"STATUS=Stopping ({why})")
        extend_timeout(self.config.global_.hard_stop_after + EXTEND_TIMEOUT_MARGIN)
        # New clients must not wait in a backlog that no worker of ours will
        # ever accept from again: refused now, or kept for the next master by
        # systemd's fd store.
        self.release_listeners()
        log.info("stopping (%s): soft-stopping %d worker(s)", why, len(self.processes))
        for worker in list(self.processes):
            worker.state = WorkerState.LEAVING
            if signal.SIGUSR1 not in worker.signals_sent and \
                    signal.SIGTERM not in worker.signals_sent:
                self.send_signal(worker, signal.SIGUSR1, why)
        for _, future in self._reload_queue:
            if future is not None and not future.done():
                future.set_result(ReloadResult(False, ["the master is stopping"]))
        self._reload_queue.clear()
        asyncio.get_running_loop().call_later(self.config.global_.hard_stop_after,
                                              self.post, HardStopDue())

    def _hard_stop(self) -> None:
        for worker in list(self.processes):
            self.send_signal(worker, signal.SIGKILL,
                             f"still running after hard_stop_after="
                             f"{self.config.global_.hard_stop_after:g}s")

    # --- main loop ------------------------------------------------------------

    async def run(self, serve_cli: Callable[["Master"], Awaitable[CliEndpoint]]) -> int:
        loop = asyncio.get_running_loop()
        become_subreaper()  # workers forked by the template are our children
        loop.add_signal_handler(signal.SIGCHLD, self.reap_children)
        for sig in (signal.SIGUSR2, signal.SIGHUP):
            loop.add_signal_handler(sig, self.post, ReloadAsked(False, None))
        loop.add_signal_handler(signal.SIGUSR1, self.post, StopAsked("SIGUSR1: soft stop"))
        loop.add_signal_handler(signal.SIGTERM, self.post, StopAsked("SIGTERM"))
        loop.add_signal_handler(signal.SIGINT, self.post, StopAsked("SIGINT"))
        # After a re-exec: what came while no handler was there is delivered
        # now, and a child that exited meanwhile is reaped.
        reexec.unblock_signals()
        self.reap_children()
        self._cli_server = await serve_cli(self)
        if self.carried is None:
            # A ready_timeout longer than TimeoutStartSec= must not get a
            # healthy, slow first start killed.
            extend_timeout(self.config.global_.ready_timeout + EXTEND_TIMEOUT_MARGIN)
        watchdog = watchdog_interval()
        if watchdog:
            loop.create_task(self._watchdog(watchdog))
        return await self.supervise()

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
        self.release_listeners()


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
