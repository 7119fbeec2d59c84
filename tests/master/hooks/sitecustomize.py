"""Worker faults for the master's tests, switched on by files, never in production.

The master tests put this directory on PYTHONPATH; Python imports
sitecustomize at start-up in every process, and this one acts only in a
worker (HAPYMASTER_CONTROL_FD is set) and only when the test has created the
named file in $HAPYMASTER_TEST_HOOKS:

- ``never-ready``: the worker hangs before it could ever send READY;
- ``exit-at-start``: the worker exits with status 3 at once;
- ``slow-start``: the next worker to start takes the file (it is renamed, so
  only one does), sleeps as many seconds as it says, then starts as usual.
"""

import os
import time

_hooks = os.environ.get("HAPYMASTER_TEST_HOOKS")
if _hooks and os.environ.get("HAPYMASTER_CONTROL_FD"):
    if os.path.exists(os.path.join(_hooks, "exit-at-start")):
        os._exit(3)
    if os.path.exists(os.path.join(_hooks, "never-ready")):
        time.sleep(3600)
    _taken = os.path.join(_hooks, f"slow-start.taken-by-{os.getpid()}")
    try:
        os.rename(os.path.join(_hooks, "slow-start"), _taken)
    except OSError:
        pass
    else:
        with open(_taken) as _slow:
            time.sleep(float(_slow.read()))
