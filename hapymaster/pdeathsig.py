"""Workers die with their master, even when the master is SIGKILLed."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent dies.

    Called twice in a worker's life: between fork and exec, and again after
    dropping privileges, because the kernel clears the setting whenever a
    process changes its uid or gid. If the parent is already gone (it died
    before the call), exit at once: the kernel will never send the signal.
    """
    _libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
