"""systemd glue: sd_notify, the watchdog, journald logging, a clean child environment.

Everything here degrades silently: without NOTIFY_SOCKET nothing is sent,
without JOURNAL_STREAM logs go to stderr as readable lines.
"""

from __future__ import annotations

import logging
import os
import sys
import time

try:
    from systemd import daemon as _daemon
    from systemd import journal as _journal
except ImportError:  # pragma: no cover - systemd-python is a hard dependency
    _daemon = None
    _journal = None

log = logging.getLogger("hapymaster")

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
    if not os.environ.get("NOTIFY_SOCKET") or _daemon is None:
        return
    try:
        if fds:
            _daemon.notify("\n".join(fields), fds=fds)
        else:
            _daemon.notify("\n".join(fields))
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


def _under_journald() -> bool:
    """True when stderr is the journal stream systemd connected us to."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if not stream or _journal is None:
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
    handler: logging.Handler
    use_journal = _under_journald() or (
        journal is True and _journal is not None and os.path.exists("/run/systemd/journal/socket"))
    if use_journal:
        fields = {"SYSLOG_IDENTIFIER": "hapymaster", "HAPYMASTER_ROLE": role,
                  "HAPYMASTER_PID": str(os.getpid())}
        if generation is not None:
            fields["HAPYMASTER_GENERATION"] = str(generation)
        handler = _journal.JournalHandler(**fields)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        label = role if generation is None else f"{role}[gen {generation}]"
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter(label))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
