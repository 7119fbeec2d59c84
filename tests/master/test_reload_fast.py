"""What keeps a reload fast (issue 8, "READY fast") without giving up a guarantee:
a template that died just before is replaced and asked again, and a
template still serves the one-worker requests of a master older than itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from master_harness import (HOOKS, ROOT, free_port, http_config, http_get,
                            worker_fault)
from test_forkserver import template_of


def test_reload_whose_template_just_died_is_retried_and_succeeds(master_factory, http_backend,
                                                                 tmp_path):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2))
    old, template = master.workers(), template_of(master)
    # The template dies as the spawn request reaches it: the master finds out
    # only then (its check just before saw it running).
    worker_fault(tmp_path, "template-exit-at-spawn")
    answer = master.reload()
    assert answer.startswith("Success=1"), answer
    assert not (tmp_path / "hooks" / "template-exit-at-spawn").exists()   # it did fire
    assert "the worker template exited during a spawn: starting a new one" in master.log()
    assert template_of(master) != template
    new = master.workers()
    assert len(new) == 2 and not set(new) & set(old)
    assert "[failed: 0]" in master.ctl("show proc")
    assert http_get(port)[0] == 200


LEGACY_MASTER = r"""
# A master older than the template: one spawn request per worker, without
# the config (the worker reads it in its boot message, with the state).
import json, os, socket, sys
from hapymaster.forkserver import FD_ENV
from hapymaster.pdeathsig import become_subreaper

become_subreaper()          # the worker is adopted by us, as by a master
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
theirs.set_inheritable(True)
template = os.spawnve(os.P_NOWAIT, sys.executable, [sys.executable, "-m", "hapymaster.forkserver"],
                      {**os.environ, FD_ENV: str(theirs.fileno())})
theirs.close()
hello = json.loads(ours.recv(65536))
assert hello.get("ready"), hello
listener = socket.create_server(("127.0.0.1", 0))
control, child_end = socket.socketpair()
socket.send_fds(ours, [json.dumps({"master_pid": os.getpid(),
                                   "listener_fds": [listener.fileno()]}).encode()],
                [child_end.fileno(), listener.fileno()])
answer = json.loads(ours.recv(65536))
child_end.close()
port = listener.getsockname()[1]
config = sys.argv[1].replace("PORT", str(port))
control.sendall(json.dumps({"type": "boot", "generation": 1, "index": 1,
                            "master_pid": os.getpid(), "config_path": "legacy.yaml",
                            "config_text": config, "listeners": [
                                {"address": f"127.0.0.1:{port}", "fd": listener.fileno()}],
                            "state": None}).encode() + b"\n")
line = control.makefile("rb").readline().decode().strip()
os.kill(answer["pid"], 9)
os.waitpid(answer["pid"], 0)
ours.close()
os.waitpid(template, 0)
print(json.dumps({"answer": answer, "line": line}))
"""


def test_template_still_serves_a_master_older_than_itself(http_backend):
    """After an upgrade the postinst reloads the master still running the old
    code: it starts a template of the new code and asks for one worker per
    request, the config text in the boot message."""
    backend = http_backend("s1")
    config = http_config(0, [backend.address]).replace("127.0.0.1:0", "127.0.0.1:PORT")
    out = subprocess.run([sys.executable, "-c", LEGACY_MASTER, config], capture_output=True,
                         text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": f"{HOOKS}{os.pathsep}{ROOT}"})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert isinstance(report["answer"].get("pid"), int), report
    assert report["line"] == "_send_status READY", (report, out.stderr)


def test_first_start_plans_no_restart_for_a_generation_not_started_yet(master_factory,
                                                                       http_backend):
    """While the first template starts, the supervisor handles events and
    reconciles: with no generation yet it once planned restarts "of generation
    0" (logged at every start) and doubled the restart backoff before any
    worker had run."""
    backend = http_backend("s1")
    master = master_factory(http_config(free_port(), [backend.address], workers=2))
    assert len(master.workers()) == 2
    assert "of generation 0" not in master.log(), master.log()
