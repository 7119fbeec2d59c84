"""Re-executing the master in place: what crosses the execve, and how.

``hapymaster reload --upgrade``, or a reload that finds the installed
package version changed, replaces the master's code without a new process:
the master ``execve``s the same interpreter with the same command line, so
its PID (systemd's MainPID), its children and every descriptor it chose to
keep survive. HAProxy's master does the same (``mworker_reexec``, its fds
named in HAPROXY_MWORKER_REEXEC); here what the new image needs is one
JSON document (``Carried``) in a memfd named by ``HAPYMASTER_REEXEC_FD``:
the listening sockets by address (the same sockets, so nothing is bound
again and no client is refused), the master CLI's listening socket (never
unlinked, so the path keeps answering), each worker's control socketpair
and its place in the process list (generation, reloads, state, signals
already sent), the counters, the fd-store names, and the connections of the
CLI clients waiting for a reload's answer, which the new image gives them.

What keeps it exact:

- The new code is checked before the old one is given up: ``python -m
  hapymaster.reexec check`` of the code on disk reads the state it will be
  handed and the config (``preflight_command``). A failure there fails the
  reload; the old master goes on.
- The signals the master handles are blocked across the execve (the mask is
  kept by the kernel, the handlers are not): a SIGTERM or SIGCHLD that comes
  in the window stays pending until the new image has its handlers, instead
  of killing the master or being lost (``exec_master``, ``unblock_signals``).
- The execve runs in the main thread: a worker's PDEATHSIG follows its
  parent *thread*, and only the thread that calls execve lives on.
- The worker template is not carried: its socket is close-on-exec, so it
  exits, and the reload that follows starts one of the new code.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, NoReturn

STATE_ENV = "HAPYMASTER_REEXEC_FD"
# Bumped when a field changes meaning: a new image that does not know the
# format refuses it in the preflight, and the old master goes on.
FORMAT = 1
BLOCKED = {signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM,
           signal.SIGINT}


class CarryError(Exception):
    """The state handed across the execve cannot be read."""


@dataclass
class CarriedWorker:
    pid: int
    generation: int
    index: int
    version: str
    started_at: float          # time.monotonic(): CLOCK_MONOTONIC, the same across execve
    state: str                 # WorkerState value
    reloads: int
    signals_sent: list[str]    # signal names
    control_fd: int
    ready_deadline: float | None = None
    unread: str = ""           # base64: bytes read from the socketpair, not a whole line yet

    def unread_bytes(self) -> bytes:
        return base64.b64decode(self.unread)


@dataclass
class CarriedReload:
    """One reload the new image must run: how, and who waits for its answer."""
    hard: bool
    client_fds: list[int] = field(default_factory=list)


@dataclass
class Carried:
    """Everything the master's new image starts from, instead of a first start."""
    version: str                     # the version that handed over (logged)
    started_at: float
    generation: int
    last_generation: int
    reloads: int
    failed_reloads: int
    config_path: str | None
    config_text: str                 # what the running workers were started with
    config_source: str
    socket_path: str
    cli_fd: int
    listeners: dict[str, int]        # str(Address) -> fd
    fdstore_names: dict[str, str]    # str(Address) -> FDNAME
    workers: list[CarriedWorker]
    counters_retired: dict[str, Any]
    counters_last: dict[str, Any]    # str(pid) -> counters
    runtime_state: Any
    restart_at: dict[str, float]     # str(slot) -> monotonic time
    restart_backoff: dict[str, float]
    reloads_pending: list[CarriedReload]
    demo_pid: int | None = None      # the embedded config's demo origins
    scratch: str | None = None       # the embedded config's temporary directory
    format: int = FORMAT

    def fds(self) -> list[int]:
        """Every descriptor that must survive the execve."""
        return [self.cli_fd, *self.listeners.values(),
                *(w.control_fd for w in self.workers if w.control_fd >= 0),   # -1: none
                *(fd for reload in self.reloads_pending for fd in reload.client_fds)]

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Carried":
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise CarryError(f"state format {doc.get('format')!r}, this code reads "
                                 f"{FORMAT}")
            doc["workers"] = [CarriedWorker(**w) for w in doc["workers"]]
            doc["reloads_pending"] = [CarriedReload(**r) for r in doc["reloads_pending"]]
            return cls(**doc)
        except CarryError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CarryError(f"unreadable state: {type(exc).__name__}: {exc}") from None


def _anonymous_file() -> int:
    try:
        return os.memfd_create("hapymaster-reexec")
    except OSError:
        # A seccomp filter may refuse memfd_create: an unlinked temporary file serves as well.
        with tempfile.TemporaryFile() as handle:
            return os.dup(handle.fileno())


def write_state(carried: Carried) -> int:
    """The state in an anonymous file, whose fd exec_master names in the environment."""
    fd = _anonymous_file()
    try:
        data = carried.to_json().encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError:
        os.close(fd)
        raise
    return fd


def take_state() -> Carried | None:
    """The state the previous image left, or None on a plain start. Read once.

    Raises CarryError: the new image cannot go on (the preflight makes that
    a case that does not happen).
    """
    fd_text = os.environ.pop(STATE_ENV, "")
    if not fd_text:
        return None
    if not fd_text.isdigit():
        raise CarryError(f"{STATE_ENV}={fd_text!r} is not a descriptor")
    fd = int(fd_text)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise CarryError(f"cannot read the state on fd {fd}: {exc.strerror}") from None
    finally:
        os.close(fd)
    carried = Carried.from_json(b"".join(chunks).decode())
    # Inherited on purpose; from now on they are this master's own, as any it opens.
    for kept in carried.fds():
        os.set_inheritable(kept, False)
    return carried


def exec_command() -> list[str]:
    """The same interpreter with the same command line (-f, -S, interpreter options)."""
    return [sys.executable, *sys.orig_argv[1:]]


def preflight_command(config_path: str | None) -> list[str]:
    """Check the code on disk before giving up this one: it reads the state on stdin."""
    return [sys.executable, "-m", "hapymaster.reexec", "check", config_path or "-"]


def exec_master(carried_fds: list[int], state_fd: int) -> NoReturn:
    """execve this master in place. Raises OSError and leaves everything as it was if it fails."""
    for fd in (*carried_fds, state_fd):
        os.set_inheritable(fd, True)
    os.environ[STATE_ENV] = str(state_fd)
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    command = exec_command()
    try:
        os.execv(command[0], command)
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        os.environ.pop(STATE_ENV, None)
        for fd in carried_fds:
            os.set_inheritable(fd, False)
        raise
    raise AssertionError("execv returned")   # pragma: no cover - it never does


def unblock_signals() -> None:
    """In the new image, once its handlers are in place: what came meanwhile is delivered."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)


def check(config_path: str | None, state_text: str) -> list[str]:
    """What the new image would fail on; empty when it can take over.

    Run by the code on disk (``preflight_command``): it imports everything the
    master runs, reads the state, parses the config the workers run and the
    one on disk the reload will read.
    """
    try:
        # Importing is the check: every module the master's image runs.
        for module in ("cli", "master", "mcli", "sockets", "sdnotify", "forkserver"):
            importlib.import_module(f"hapymaster.{module}")
        from .config import ConfigError, parse_config, read_config
    except BaseException as exc:  # noqa: BLE001 - a broken upgrade must say what broke
        if isinstance(exc, SyntaxError):
            return [f"{exc.filename}:{exc.lineno}: SyntaxError: {exc.msg}"]
        return [f"{type(exc).__name__}: {exc}"]
    try:
        carried = Carried.from_json(state_text)
    except CarryError as exc:
        return [f"the new code cannot take over: {exc}"]
    try:
        parse_config(carried.config_text, carried.config_source)
        if config_path is not None:
            read_config(config_path)
    except ConfigError as exc:
        return list(exc.errors)
    return []


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "check":
        print("usage: python -m hapymaster.reexec check CONFIG|-  (state on stdin); "
              "run by the master before it re-executes", file=sys.stderr)
        return 2
    errors = check(None if argv[1] == "-" else argv[1], sys.stdin.read())
    for error in errors:
        print(error)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
