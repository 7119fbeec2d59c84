"""systemd glue: sd_notify, the watchdog, journald logging, a clean child environment.

Everything here degrades silently: without NOTIFY_SOCKET nothing is sent,
without JOURNAL_STREAM logs go to stderr as readable lines (written without
ever waiting: a line that finds the stderr pipe full is dropped).

systemd-python is imported only by ``notify`` (the master's): its modules
load libsystemd and, for ``systemd.journal``, uuid and datetime, ~1.6 MiB of
a worker's RSS for nothing a worker needs (issue 9). Log entries go to
journald by its native protocol, written here (``_JournalHandler``).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import sys
import time

log = logging.getLogger("hapymaster")

JOURNAL_SOCKET = "/run/systemd/journal/socket"

# What systemd hands the main process only. A worker that inherited
# NOTIFY_SOCKET could send READY=1 on the master's behalf (NotifyAccess=main
# would drop it, but under NotifyAccess=all it would lie); LISTEN_* would make
# a worker think the sockets are systemd's to take; FDSTORE that it may store
# fds (the store is the master's: hapymaster.sockets).
_MASTER_ONLY_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                    "LISTEN_PID", "LISTEN_FDNAMES", "FDSTORE")


def notify(*fields: str, fds: list[int] | None = None) -> None:
    """Send ``FIELD=value`` lines to systemd; a no-op when not run by systemd.

    ``fds`` go along as SCM_RIGHTS (``FDSTORE=1``): systemd keeps a copy.
    """
    if not os.environ.get("NOTIFY_SOCKET"):
        return
    try:
        from systemd import daemon
    except ImportError:  # pragma: no cover - systemd-python is a hard dependency
        return
    try:
        if fds:
            daemon.notify("\n".join(fields), fds=fds)
        else:
            daemon.notify("\n".join(fields))
    except OSError as exc:
        log.warning("sd_notify failed: %s", exc)


def extend_timeout(seconds: float) -> None:
    """Ask systemd for ``seconds`` more before it calls the current start or stop late.

    systemd never shortens TimeoutStartSec=/TimeoutStopSec= this way, it only
    allows more: a master whose own bound (ready_timeout, hard_stop_after) is
    longer than the unit's is not killed while it keeps that bound.
    """
    notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval() -> float | None:
    """Half the watchdog timeout systemd set for us, or None when there is none."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    return int(usec) / 2_000_000


def child_environment() -> dict[str, str]:
    """The master's environment without what systemd meant for the master alone."""
    return {key: value for key, value in os.environ.items() if key not in _MASTER_ONLY_ENV}


def nonblocking_stderr() -> int:
    """A descriptor for stderr on which a write never blocks.

    Setting O_NONBLOCK on fd 2 itself would change it for every process
    sharing that open file (the master and each worker). A pipe or a terminal
    opened again through /proc is a new open file of our own; a regular file
    never blocks; a socket gets a non-blocking duplicate.
    """
    try:
        mode = os.fstat(2).st_mode
    except OSError:
        return 2
    if stat.S_ISREG(mode):
        return 2
    try:
        return os.open("/proc/self/fd/2", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        if stat.S_ISSOCK(mode):
            # A socket cannot be opened through /proc; a non-blocking
            # duplicate shares the flag with fd 2, which only we hold here.
            sock = socket.socket(fileno=os.dup(2))
            sock.setblocking(False)
            return sock.detach()
        return 2


class _StderrHandler(logging.Handler):
    """Lines to stderr that never wait: with the pipe full, a line is dropped.

    A worker (or the master) blocked on a stderr nobody reads would stop
    serving; the access log's drop warnings come through here, exactly when
    that pipe is full.
    """

    def __init__(self) -> None:
        super().__init__()
        self.fd = nonblocking_stderr()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "replace")
            while data:
                data = data[os.write(self.fd, data):]
        except BlockingIOError:
            pass
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)

    def close(self) -> None:
        if self.fd > 2:
            os.close(self.fd)
            self.fd = 2
        super().close()


class _StderrFormatter(logging.Formatter):
    def __init__(self, role: str):
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.created))
        text = f"{stamp} hapymaster[{os.getpid()}] {self.role} {record.levelname.lower()}: " \
               f"{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def journal_field(name: bytes, value: bytes) -> bytes:
    """One field of journald's native protocol; the binary form when the value has a newline."""
    if b"\n" in value:
        return name + b"\n" + struct.pack("<Q", len(value)) + value + b"\n"
    return name + b"=" + value + b"\n"


def journal_socket() -> socket.socket:
    """A datagram socket for journald's native protocol that never blocks (the
    daemon's log here, the access log's journald sink)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        # As sd_journal_send does: room for a burst while journald catches up.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    except OSError:
        pass
    return sock


def _journal_priority(level: int) -> int:
    """syslog's priority for a logging level, as systemd.journal.JournalHandler maps it."""
    for limit, priority in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                            (logging.ERROR, 3), (logging.CRITICAL, 2)):
        if level <= limit:
            return priority
    return 1


class _JournalHandler(logging.Handler):
    """Structured entries to journald's native socket, one datagram each.

    The fields systemd.journal.JournalHandler sends (MESSAGE, PRIORITY,
    LOGGER, CODE_FILE/LINE/FUNC, the traceback in MESSAGE and EXCEPTION_TEXT)
    and ours (``fields``), without importing systemd-python (see the module's
    docstring). Never waits, as the stderr handler: with journald stalled and
    the socket's buffer full, an entry is dropped; one too large for a
    datagram goes in a sealed memfd, as sd_journal_send sends it.
    """

    def __init__(self, path: str, fields: dict[str, str]) -> None:
        super().__init__()
        self.path = path
        self.fixed = b"".join(journal_field(key.encode(), value.encode())
                              for key, value in fields.items())
        self.sock = journal_socket()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            texts = [(b"MESSAGE", self.format(record)), (b"LOGGER", record.name),
                     (b"CODE_FILE", record.pathname), (b"CODE_FUNC", record.funcName or "")]
            if record.exc_text:
                texts.append((b"EXCEPTION_TEXT", record.exc_text))
            entry = [journal_field(name, text.encode("utf-8", "replace")) for name, text in texts]
            entry += [b"PRIORITY=%d\n" % _journal_priority(record.levelno),
                      b"CODE_LINE=%d\n" % record.lineno, self.fixed]
            self._send(b"".join(entry))
        except Exception:  # noqa: BLE001 - logging must not raise into the caller
            self.handleError(record)

    def _send(self, data: bytes) -> None:
        try:
            self.sock.sendto(data, self.path)
            return
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            # journald takes only a memfd nobody can change any more.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL)
            # Not socket.send_fds: in 3.11 it drops the address.
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))],
                              0, self.path)
        except BlockingIOError:
            pass
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()


def under_journald() -> bool:
    """True when stderr is the journal stream systemd connected us to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream:
        return False
    try:
        device, inode = (int(part) for part in stream.split(":"))
        info = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (info.st_dev, info.st_ino) == (device, inode)


def setup_logging(role: str, generation: int | None = None, level: int = logging.INFO,
                  journal: bool | None = None) -> None:
    """Route the ``hapymaster`` loggers to journald (structured) or to stderr.

    ``role`` is ``master`` or ``worker``; every journal entry carries
    HAPYMASTER_ROLE, HAPYMASTER_PID and, for workers, HAPYMASTER_GENERATION,
    so ``journalctl HAPYMASTER_ROLE=worker`` picks out the workers.
    ``journal=True`` (a daemonized master, whose stderr is /dev/null) logs to
    journald whenever its socket exists. Call again after fork to refresh the pid.
    """
    root = logging.getLogger("hapymaster")
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler: logging.Handler
    use_journal = under_journald() or (journal is True and os.path.exists(JOURNAL_SOCKET))
    if use_journal:
        fields = {"SYSLOG_IDENTIFIER": "hapymaster", "HAPYMASTER_ROLE": role,
                  "HAPYMASTER_PID": str(os.getpid())}
        if generation is not None:
            fields["HAPYMASTER_GENERATION"] = str(generation)
        handler = _JournalHandler(JOURNAL_SOCKET, fields)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        label = role if generation is None else f"{role}[gen {generation}]"
        handler = _StderrHandler()
        handler.setFormatter(_StderrFormatter(label))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
