"""What keeps a reload fast (issue 8, "READY fast") without giving up a guarantee:
a template that died just before is replaced and asked again, the serving
generation yields the CPU only for the reload's window, and a template still
serves the one-worker requests of a master older than itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from master_harness import (HOOKS, ROOT, free_port, http_config, http_get, wait_for,
                            worker_fault)
from test_forkserver import template_of


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[16])


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


def test_serving_generation_yields_the_cpu_only_while_a_reload_boots(master_factory,
                                                                     http_backend, tmp_path):
    gate = threading.Event()
    backend = http_backend("s1", gate=gate)
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2,
                                        ready_timeout="20s", hard_stop_after="30s"))
    old = master.workers()
    assert [nice_of(pid) for pid in old] == [0, 0]
    # A request in flight keeps its old worker alive after the reload.
    answers: list[tuple[int, str]] = []
    request = threading.Thread(target=lambda: answers.append(http_get(port, timeout=30)))
    request.start()
    wait_for(lambda: backend.server.hits == 1, what="the request to reach the backend")  # type: ignore[attr-defined]
    # One new worker takes 2 s to start: the reload's window is that long.
    worker_fault(tmp_path, "slow-start", "2")
    reload = subprocess.Popen([sys.executable, "-m", "hapymaster", "reload", "-S",
                               master.socket_path], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        wait_for(lambda: [nice_of(pid) for pid in old] == [10, 10],
                 what="the serving workers to yield the CPU during the reload")
        out, _ = reload.communicate(timeout=30)
        assert out.startswith("Success=1"), out
        # Given back at once: soft-stopped, they finish their connections at full speed.
        busy = [pid for pid in old if pid in master.old_workers()]
        assert busy and all(nice_of(pid) == 0 for pid in busy)
        assert all(nice_of(pid) == 0 for pid in master.workers())
    finally:
        reload.kill()
        gate.set()
        request.join(30)
    assert answers and answers[0][0] == 200


def test_failed_reload_gives_the_serving_generation_its_priority_back(master_factory,
                                                                      http_backend, tmp_path):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2,
                                        ready_timeout="3s"))
    old = master.workers()
    worker_fault(tmp_path, "never-ready")
    answer = master.reload()
    assert answer.startswith("Success=0") and "not READY within 3s" in answer, answer
    assert master.workers() == old
    assert [nice_of(pid) for pid in old] == [0, 0]
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
