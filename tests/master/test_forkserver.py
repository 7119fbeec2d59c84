"""The worker template (hapymaster/forkserver.py), end to end: real master,
real template, real forked workers, real signals, real code on disk."""

from __future__ import annotations

import os
import signal

from master_harness import (HOOKS, copy_of_package, free_port, http_config, http_get, pid_alive,
                            wait_for, worker_fault)

TEMPLATE_COMM = "hapymaster-tmpl"


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[1])


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as handle:
        return handle.read().strip()


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as handle:
            found += [int(child) for child in handle.read().split()]
    return found


def sockets_of(pid: int) -> set[str]:
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def only_child(parent: int, name: str, what: str) -> int:
    """The one live child of ``parent`` whose comm is ``name``, once it exists."""
    def find() -> list[int]:
        return [c for c in children(parent) if pid_alive(c) and comm(c) == name]
    found = wait_for(find, what=what)
    assert len(found) == 1, found  # type: ignore[arg-type]
    return found[0]  # type: ignore[index]


def template_of(master) -> int:  # type: ignore[no-untyped-def]
    """The master's one worker template."""
    return only_child(master.pid, TEMPLATE_COMM, "the worker template")


def test_workers_are_forked_from_the_template_and_the_master_is_their_parent(
        master_factory, http_backend):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2))
    template = template_of(master)
    workers = master.workers()
    assert len(workers) == 2 and template not in workers
    for worker in workers:
        assert ppid(worker) == master.pid        # adopted: the master reaps them
        assert comm(worker) != TEMPLATE_COMM
    assert ppid(template) == master.pid
    # A worker holds none of the template's sockets (its socketpair to the master).
    assert all(not sockets_of(worker) & sockets_of(template) for worker in workers)
    assert http_get(port)[0] == 200
    # The master is their reaper: a killed current worker is reaped and replaced.
    os.kill(workers[0], signal.SIGKILL)
    wait_for(lambda: workers[0] not in master.workers() and len(master.workers()) == 2,
             what="the killed worker to be replaced")
    assert f"worker {workers[0]} (generation 1, #1) exited (killed by SIGKILL)" in master.log()
    assert not pid_alive(workers[0])              # reaped, not left a zombie
    replacement = next(p for p in master.workers() if p not in workers)
    # Adopted before it is READY (the template answers the pid while its
    # intermediate process may still be exiting).
    wait_for(lambda: f"worker {replacement} (generation 1, #1) is READY" in master.log(),
             what="the replacement to be READY")
    assert ppid(replacement) == master.pid
    assert template_of(master) == template
    wait_for(lambda: http_get(port)[0] == 200, what="the replacement to serve")


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as handle:
        return {line.split(None, 5)[5].strip() for line in handle if len(line.split(None, 5)) > 5}


def test_workers_load_neither_pyyaml_nor_libsystemd(master_factory, http_backend):
    # Issue 9: a worker's idle RSS. It gets the master's parsed config (a
    # pickle) and logs to journald by the native protocol itself, so PyYAML
    # (libyaml) and systemd-python (libsystemd) are for the master alone.
    # A template running other code than the master (after an upgrade) is
    # sent the text, and parses it.
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    assert http_get(port)[0] == 200
    for pid in (template_of(master), *master.workers()):
        loaded = mapped_files(pid)
        assert not [path for path in loaded if "_yaml" in path or "libsystemd" in path], loaded
    assert [path for path in mapped_files(master.pid) if "_yaml" in path]   # the check checks


def spare_of(template: int) -> int:
    """The template's spare intermediate process (its one live child when idle)."""
    assert len([c for c in children(template) if pid_alive(c)]) <= 1
    return only_child(template, "hapymaster-fork", "the spare intermediate process")


def test_the_spare_intermediate_forks_the_next_generation_and_a_dead_one_is_not_missed(
        master_factory, http_backend):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2))
    template = template_of(master)
    spare = spare_of(template)
    # It must not hold the template's socketpair to the master: the master
    # learns that the template died from that socket's EOF.
    assert not sockets_of(spare) & sockets_of(template)
    assert master.reload().startswith("Success=1")
    new = master.workers()
    assert len(new) == 2 and all(ppid(worker) == master.pid for worker in new)
    assert not pid_alive(spare)                  # it was the intermediate, and is reaped
    assert http_get(port)[0] == 200
    # A spare killed (OOM, an operator): the next reload forks an intermediate itself.
    next_spare = spare_of(template)
    assert next_spare != spare
    os.kill(next_spare, signal.SIGKILL)
    wait_for(lambda: not pid_alive(next_spare), what="the killed spare to be reaped")
    assert master.reload().startswith("Success=1")
    assert http_get(port)[0] == 200 and template_of(master) == template
    # The template killed: its spare goes with it (PDEATHSIG), the master notices.
    last_spare = spare_of(template)
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: not pid_alive(last_spare), what="the spare to die with the template")
    assert master.reload().startswith("Success=1")
    assert template_of(master) != template and http_get(port)[0] == 200


def test_killed_template_is_restarted_when_next_needed(master_factory, http_backend):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2))
    template = template_of(master)
    old = master.workers()
    os.kill(template, signal.SIGKILL)
    wait_for(lambda: f"the worker template {template} exited (killed by SIGKILL)" in master.log(),
             what="the master to reap the template")
    assert http_get(port)[0] == 200               # the workers do not need it
    # A current worker that dies now is still replaced: through a new template.
    os.kill(old[0], signal.SIGKILL)
    wait_for(lambda: old[0] not in master.workers() and len(master.workers()) == 2,
             what="the killed worker to be replaced")
    restarted = template_of(master)
    assert restarted != template
    assert "the worker template (pid %d) is gone: starting a new one" % template in master.log()
    old = master.workers()
    answer = master.reload()
    assert answer.startswith("Success=1"), answer
    assert template_of(master) == restarted
    new = master.workers()
    assert len(new) == 2 and not set(new) & set(old)
    assert all(ppid(worker) == master.pid for worker in new)
    assert http_get(port)[0] == 200


def test_stale_template_is_replaced_when_the_code_on_disk_changed(
        master_factory, http_backend, tmp_path):
    backend = http_backend("s1")
    port = free_port()
    site = copy_of_package(tmp_path)
    master = master_factory(http_config(port, [backend.address]),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    assert "Version: 0.1.0\n" in master.ctl("@1 show info")
    template = template_of(master)
    # Nothing changed: the same template forks the new generation.
    assert master.reload().startswith("Success=1")
    assert template_of(master) == template
    # An "upgrade": the code on disk changes between two reloads. Same size,
    # same mtime, as dpkg can leave it (it sets the mtime stored in the .deb).
    init = site / "hapymaster" / "__init__.py"
    before = init.stat()
    init.write_text(init.read_text().replace('__version__ = "0.1.0"', '__version__ = "0.1.9"'))
    os.utime(init, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert init.stat().st_size == before.st_size
    answer = master.reload()
    assert answer.startswith("Success=1"), answer
    assert "Version: 0.1.9\n" in master.ctl("@1 show info")
    assert template_of(master) != template
    assert "the code on disk changed: replacing the worker template" in master.log()


def test_template_that_cannot_start_fails_the_reload_and_old_workers_keep_serving(
        master_factory, http_backend, notify_socket, tmp_path):
    backend = http_backend("s1")
    port = free_port()
    site = copy_of_package(tmp_path)
    master = master_factory(http_config(port, [backend.address], workers=2),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    old = master.workers()
    # A broken upgrade: a worker module no longer compiles.
    stats = site / "hapymaster" / "worker" / "stats.py"
    good = stats.read_text()
    stats.write_text(good + "\ndef broken(:\n")
    line = good.count("\n") + 2
    mark = len(notify_socket.snapshot())
    answer = master.reload()
    assert answer.startswith("Success=0"), answer
    assert f"the worker template cannot start: {stats}:{line}: SyntaxError" in answer, answer
    assert "the previous workers keep serving" in answer
    assert notify_socket.wait("READY", "1", after=mark)["STATUS"].startswith("Reload failed")
    assert master.workers() == old
    assert http_get(port)[0] == 200
    assert "[failed: 1]" in master.ctl("show proc")
    # Fixed on disk: the next reload starts a template and succeeds.
    stats.write_text(good)
    answer = master.reload()
    assert answer.startswith("Success=1"), answer
    assert not set(master.workers()) & set(old)
    assert http_get(port)[0] == 200


def test_worker_restart_waits_for_a_template_that_can_start(master_factory, http_backend,
                                                            tmp_path):
    backend = http_backend("s1")
    port = free_port()
    site = copy_of_package(tmp_path)
    master = master_factory(http_config(port, [backend.address], workers=2),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    first, second = master.workers()
    stats = site / "hapymaster" / "worker" / "stats.py"
    good = stats.read_text()
    stats.write_text(good + "\ndef broken(:\n")
    os.kill(template_of(master), signal.SIGKILL)
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: "cannot restart worker #1: the worker template cannot start" in master.log(),
             what="a failed restart")
    assert master.workers() == [second] and http_get(port)[0] == 200
    stats.write_text(good)
    wait_for(lambda: len(master.workers()) == 2, what="worker #1 to be restarted")
    assert http_get(port)[0] == 200


def test_first_start_fails_when_the_template_cannot_start(master_factory, http_backend,
                                                          tmp_path):
    backend = http_backend("s1")
    worker_fault(tmp_path, "template-exit-at-start")
    master = master_factory(http_config(free_port(), [backend.address]), wait_ready=False)
    assert master.wait_exit(20) == 1
    assert "first start failed: the worker template cannot start" in master.log()


def test_template_that_hangs_fails_the_reload_within_ready_timeout(master_factory, http_backend,
                                                                   tmp_path):
    backend = http_backend("s1")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], ready_timeout="2s"))
    old = master.workers()
    template = template_of(master)
    worker_fault(tmp_path, "template-hang-at-start")
    os.kill(template, signal.SIGKILL)   # the reload must start a new one, which hangs
    # Reaped, so its socket is closed for sure: otherwise, on a loaded machine,
    # the reload may still find the dying one and fail on its broken pipe instead.
    wait_for(lambda: f"the worker template {template} exited" in master.log(),
             what="the killed template to be reaped")
    answer = master.reload()
    assert answer.startswith("Success=0"), answer
    assert "was not ready within 2s" in answer and "the previous workers keep serving" in answer
    assert master.workers() == old and http_get(port)[0] == 200
    hung = int(answer.split("the worker template (pid ")[1].split(")")[0])
    wait_for(lambda: not pid_alive(hung), what="the hung template to be killed")
    (tmp_path / "hooks" / "template-hang-at-start").unlink()
    assert master.reload().startswith("Success=1")


def test_master_sigkill_takes_the_template_and_the_workers_down(master_factory, http_backend):
    backend = http_backend("s1")
    master = master_factory(http_config(free_port(), [backend.address], workers=2))
    assert master.reload().startswith("Success=1")   # workers of a reload, too
    template = template_of(master)
    processes = [template, *master.workers()]
    master.process.kill()
    master.process.wait(5)
    # At once, by the kernel (PDEATHSIG armed once adopted by the master).
    wait_for(lambda: not any(pid_alive(p) for p in processes), timeout=3,
             what="the template and the workers to die")


def test_an_unreadable_pickled_config_is_reported_not_a_crash():
    # The intermediate process answers every bad spawn request with a reason
    # ("-..." on its pipe); a config pickle this code cannot load (garbage,
    # or a class it lacks) used to end it silently: "the intermediate
    # process died".
    import socket
    import types

    from hapymaster import forkserver

    memfd = os.memfd_create("config")
    os.write(memfd, b"not a pickle")
    control, other = socket.socketpair()
    read_end, write_end = os.pipe()
    request = {"indexes": [1], "config": "pickle", "master_pid": os.getpid(), "generation": 1}
    code = types.SimpleNamespace(name=b"hapymaster-test",
                                 config_error=type("ConfigError", (Exception,), {}))
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        forkserver._middle(write_end, request, [memfd, control.fileno()], code)  # exits
    os.close(write_end)
    answer = os.read(read_end, 4096).decode()
    os.close(read_end)
    _, status = os.waitpid(pid, 0)
    os.close(memfd)
    control.close()
    other.close()
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer.startswith("-a bad spawn request: cannot read the master's parsed config: "
                             "UnpicklingError"), answer
