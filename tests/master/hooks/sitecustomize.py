"""Worker faults for the master's tests, switched on by files, never in production.

The master tests put this directory on PYTHONPATH; Python imports
sitecustomize at start-up in every process, and this one acts only in a
worker (HAPYMASTER_CONTROL_FD is set) and only when the test has created the
named file in $HAPYMASTER_TEST_HOOKS. A worker forked from the worker
template never starts an interpreter, so the faults also run after every
fork (the template sets HAPYMASTER_CONTROL_FD just before the fork that makes
the worker, so its intermediate process is left alone):

- ``never-ready``: the worker hangs before it could ever send READY;
- ``exit-at-start``: the worker exits with status 3 at once;
- ``slow-start``: the next worker to start takes the file (it is renamed, so
  only one does), sleeps as many seconds as it says, then starts as usual;
- ``template-exit-at-start``: the worker template exits with status 3 at once;
- ``template-hang-at-start``: the worker template hangs before it is ready;
- ``reexec-slow-start``: the master's new image, right after a re-exec, sleeps
  as many seconds as the file says before anything else runs.
- ``template-exit-at-spawn``: the next worker template to receive a spawn
  request takes the file (renamed, so only one does) and exits with status 3
  without answering, as a template killed just before a reload would.
"""

import os
import socket
import time

_hooks = os.environ.get("HAPYMASTER_TEST_HOOKS")


def _worker_faults() -> None:
    if not os.environ.get("HAPYMASTER_CONTROL_FD"):
        return
    if os.path.exists(os.path.join(_hooks, "exit-at-start")):
        os._exit(3)
    if os.path.exists(os.path.join(_hooks, "never-ready")):
        time.sleep(3600)
    taken = os.path.join(_hooks, f"slow-start.taken-by-{os.getpid()}")
    try:
        os.rename(os.path.join(_hooks, "slow-start"), taken)
    except OSError:
        pass
    else:
        with open(taken) as slow:
            time.sleep(float(slow.read()))


if _hooks:
    if os.environ.get("HAPYMASTER_REEXEC_FD"):
        try:
            with open(os.path.join(_hooks, "reexec-slow-start")) as slow:
                time.sleep(float(slow.read()))
        except OSError:
            pass
    if os.environ.get("HAPYMASTER_FORKSERVER_FD"):
        if os.path.exists(os.path.join(_hooks, "template-exit-at-start")):
            os._exit(3)
        if os.path.exists(os.path.join(_hooks, "template-hang-at-start")):
            time.sleep(3600)
        _recv_fds = socket.recv_fds

        def _recv_fds_or_exit(*args, **kwargs):  # type: ignore[no-untyped-def]
            received = _recv_fds(*args, **kwargs)
            try:
                os.rename(os.path.join(_hooks, "template-exit-at-spawn"),
                          os.path.join(_hooks, f"template-exit-at-spawn.taken-by-{os.getpid()}"))
            except OSError:
                return received
            os._exit(3)

        socket.recv_fds = _recv_fds_or_exit
    _worker_faults()
    os.register_at_fork(after_in_child=_worker_faults)
