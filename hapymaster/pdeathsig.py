"""Process relations, by prctl: workers die with their master, even when the
master is SIGKILLed, and the master adopts the workers the template forks."""

from __future__ import annotations

import _ctypes
import os
import signal
import time

# prctl and mallopt by _ctypes, ctypes' C core, without the ctypes package:
# its Python half (some forty classes) was 0.3 MiB of every worker's idle RSS
# (bench/worker_rss.py, issue 9). What ctypes.CDLL(None, use_errno=True).name
# builds: a function pointer class returning a C int, arguments converted as
# ctypes does (int: C int, bytes: char *), errno saved for get_errno().


class _CInt(_ctypes._SimpleCData):
    _type_ = "i"


class _LibcFunction(_ctypes.CFuncPtr):
    _flags_ = _ctypes.FUNCFLAG_CDECL | _ctypes.FUNCFLAG_USE_ERRNO
    _restype_ = _CInt


class _Libc:
    _handle = _ctypes.dlopen(None, os.RTLD_NOW)   # the process's own symbols: libc's


def libc_function(name: str) -> "_ctypes.CFuncPtr":
    """The C library's function ``name``, returning an int (AttributeError: none)."""
    return _LibcFunction((name, _Libc()))


_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36
_prctl = libc_function("prctl")
# How long a forked worker waits to be handed to the master (the intermediate
# process exits right after forking it: normally well under a millisecond).
REPARENT_TIMEOUT = 2.0


def become_subreaper() -> None:
    """Adopt orphaned descendants: workers forked by the worker template become
    our children (we reap them, see their exit status, and they can die with us)."""
    if _prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(_ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def set_process_name(name: bytes) -> None:
    """The name ``ps -o comm``, top and the journal's _COMM show (15 bytes at most)."""
    _prctl(_PR_SET_NAME, name[:15], 0, 0, 0)   # cosmetic: a failure changes nothing


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    Called twice in a worker's life: when it starts (between fork and exec,
    or once adopted by the master: ``die_with_reaper``), and again after
    dropping privileges, because the kernel clears the setting whenever a
    process changes its uid or gid. If the parent is already gone (it died
    before the call), exit at once: the kernel will never send the signal.
    """
    _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
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
