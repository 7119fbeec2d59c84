"""Process relations, by prctl: workers die with their master, even when the
master is SIGKILLed, and the master adopts the workers the template forks."""

from __future__ import annotations

import ctypes
import os
import signal
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_libc = ctypes.CDLL(None, use_errno=True)
# How long a forked worker waits to be handed to the master (the intermediate
# process exits right after forking it: normally well under a millisecond).
REPARENT_TIMEOUT = 2.0


def become_subreaper() -> None:
    """Adopt orphaned descendants: workers forked by the worker template become
    our children (we reap them, see their exit status, and they can die with us)."""
    if _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def set_process_name(name: bytes) -> None:
    """The name ``ps -o comm``, top and the journal's _COMM show (15 bytes at most)."""
    _libc.prctl(_PR_SET_NAME, name[:15], 0, 0, 0)   # cosmetic: a failure changes nothing


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    Called twice in a worker's life: when it starts (between fork and exec,
    or once adopted by the master: ``die_with_reaper``), and again after
    dropping privileges, because the kernel clears the setting whenever a
    process changes its uid or gid. If the parent is already gone (it died
    before the call), exit at once: the kernel will never send the signal.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def die_with_reaper(reaper_pid: int, timeout: float = REPARENT_TIMEOUT,
                    sig: int = signal.SIGKILL) -> None:
    """``die_with_parent`` for a process whose own parent is exiting so that
    ``reaper_pid`` (a child subreaper) adopts it: the worker template's double fork.

    The death signal follows the parent of the moment: armed before the
    adoption it would fire when the intermediate process exits. So wait to be
    adopted (the intermediate exits right after the fork: a few ms at most,
    polled every 0.1-1 ms: a reload waits for it), then arm it. Never adopted
    within ``timeout`` means the reaper is gone: exit.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while os.getppid() != reaper_pid:
        if time.monotonic() > deadline:
            os._exit(1)
        time.sleep(delay)
        delay = min(delay * 2, 0.001)
    die_with_parent(reaper_pid, sig)
