"""The master, end to end: real master subprocess, real workers, real signals,
a NOTIFY_SOCKET the test owns, real backends on 127.0.0.1."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from master_harness import (ROOT, connection_owner, free_port, http_config, http_get, pid_alive,
                            tcp_config, wait_for, worker_fault)


def open_echo(port: int) -> socket.socket:
    """A tcp-mode connection through the proxy, proven to be relayed."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"ping\n")
    assert sock.recv(100) == b"ping\n"
    return sock


def open_echo_on(port: int, worker: int, others: list[int]) -> socket.socket:
    """A relayed connection held by ``worker``. Just after a reload, the generation
    being soft-stopped may still accept one (and serve it, rightly); try again."""
    for _ in range(50):
        sock = open_echo(port)
        if connection_owner(sock, [worker, *others]) == worker:
            return sock
        sock.close()
        time.sleep(0.1)
    raise AssertionError(f"worker {worker} never got a connection")


# --- start and READY ------------------------------------------------------------


def test_ready_only_after_frontend_serves(master_factory, notify_socket, http_backend):
    backend = http_backend("alpha")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]), wait_ready=False)
    ready = notify_socket.wait("READY", "1", timeout=20)
    # The very first request after READY=1 must be served: READY means serving.
    status, body = http_get(port)
    assert status == 200 and body.startswith("alpha /")
    assert ready["MAINPID"] == str(master.pid)
    assert "STATUS" in ready
    assert "worker" in master.log() and "READY" in master.log()


def test_workers_get_no_systemd_environment(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]),
                            env={"WATCHDOG_USEC": "0", "LISTEN_FDS": "3", "LISTEN_PID": "1"})
    worker = master.workers()[0]
    environ = Path(f"/proc/{worker}/environ").read_bytes().split(b"\0")
    names = {entry.split(b"=", 1)[0].decode() for entry in environ if entry}
    assert not names & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                        "LISTEN_PID", "LISTEN_FDNAMES"}


def test_show_proc_format(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address], workers=2))
    text = master.ctl("show proc")
    lines = text.splitlines()
    assert lines[0].split() == ["#<PID>", "<type>", "<reloads>", "<uptime>", "<version>"]
    assert lines[1] == "# master"
    assert lines[2].split()[:5] == [str(master.pid), "master", "0", "[failed:", "0]"]
    assert lines[3] == "# workers"
    assert len([p for p in master.show_proc() if p.section == "workers"]) == 2
    assert "# old workers" in lines


def test_show_proc_through_socat(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]))
    out = subprocess.run(["socat", "-", f"UNIX:{master.socket_path}"], input=b"show proc\n",
                         capture_output=True, timeout=10).stdout.decode()
    assert "# workers" in out and str(master.pid) in out


def test_master_socket_is_private(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]))
    assert os.stat(master.socket_path).st_mode & 0o777 == 0o600


def test_worker_cli_routing(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address], workers=2))
    pids = master.workers()
    assert "Pid" in master.ctl("@1 show info") or "pid" in master.ctl("@1 show info").lower()
    assert str(pids[1]) in master.ctl(f"@!{pids[1]} show info")
    both = master.ctl("@* show info")
    assert str(pids[0]) in both and str(pids[1]) in both
    assert "No such worker" in master.ctl("@9 show info")
    assert "Unknown command" in master.ctl("frobnicate")


def test_send_status_refused_on_public_socket(master_factory, http_backend, tmp_path):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address], ready_timeout="2s"))
    before = master.show_proc()
    answer = master.ctl("_send_status READY")
    assert "Permission denied" in answer
    assert master.show_proc() == before
    # Nor can it complete a reload whose worker never says READY.
    worker_fault(tmp_path, "never-ready")
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", master.reload()))
    thread.start()
    time.sleep(0.5)
    assert "Permission denied" in master.ctl("_send_status READY")
    thread.join(15)
    assert result["r"].startswith("Success=0")
    assert [p.pid for p in master.show_proc() if p.section == "workers"] == \
        [p.pid for p in before if p.section == "workers"]


# --- reload triggers --------------------------------------------------------------


def _reload_and_check(master, notify_socket, trigger) -> None:
    old = master.workers()
    mark = len(notify_socket.snapshot())
    trigger()
    reloading = notify_socket.wait("RELOADING", "1", after=mark)
    assert int(reloading["MONOTONIC_USEC"]) > 0 and "STATUS" in reloading
    notify_socket.wait("READY", "1", after=mark)
    new = wait_for(lambda: [p for p in master.workers() if p not in old], what="new workers")
    assert new and not set(new) & set(old)
    wait_for(lambda: not any(pid_alive(p) for p in old), what="old workers gone")


@pytest.mark.parametrize("trigger", ["SIGUSR2", "SIGHUP", "cli", "cli-hard", "command"])
def test_reload_triggers(master_factory, notify_socket, http_backend, trigger):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    if trigger.startswith("SIG"):
        action = lambda: os.kill(master.pid, getattr(signal, trigger))  # noqa: E731
    elif trigger == "cli":
        action = lambda: master.reload().startswith("Success=1") or pytest.fail("reload")  # noqa: E731
    elif trigger == "cli-hard":
        action = lambda: master.reload(hard=True).startswith("Success=1") or pytest.fail("reload")  # noqa: E731
    else:
        def action() -> None:
            out = subprocess.run([sys.executable, "-m", "hapymaster", "reload", "-S",
                                  master.socket_path], capture_output=True, timeout=30)
            assert out.returncode == 0, out
            assert out.stdout.startswith(b"Success=1")
    _reload_and_check(master, notify_socket, action)
    assert http_get(port)[0] == 200
    expected = "SIGTERM" if trigger == "cli-hard" else "SIGUSR1"
    assert [s for s, _ in master.signals_sent()] == [expected]


def test_reload_picks_up_new_config(master_factory, http_backend):
    first, second = http_backend("first"), http_backend("second")
    port = free_port()
    master = master_factory(http_config(port, [first.address]))
    assert http_get(port)[1].startswith("first")
    master.write_config(http_config(port, [second.address]))
    assert master.reload().startswith("Success=1")
    # The answer comes once the new generation is READY and the old one has
    # been sent SIGUSR1; until it handles it (microseconds, more on a loaded
    # machine) it may still accept a connection, and serves it: no error,
    # the old config. After that, only the new config serves.
    wait_for(lambda: http_get(port)[1].startswith("second"), 10, "the new config to serve")


def test_reload_adds_and_removes_listeners(master_factory, http_backend):
    backend = http_backend("a")
    port, extra = free_port(), free_port()
    master = master_factory(http_config(port, [backend.address]))
    master.write_config(http_config(port, [backend.address]).replace(
        f'bind: ["127.0.0.1:{port}"]', f'bind: ["127.0.0.1:{port}", "127.0.0.1:{extra}"]'))
    assert master.reload().startswith("Success=1")
    assert http_get(extra)[0] == 200
    master.write_config(http_config(port, [backend.address]))
    assert master.reload().startswith("Success=1")
    wait_for(lambda: not master.old_workers(), what="old workers gone")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", extra), timeout=2).close()


def test_coalesced_reloads(master_factory, http_backend, tmp_path):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]))
    # The first reload lasts a second (a reload is tens of milliseconds
    # otherwise, over before the six requests are all in): the others come
    # while it runs.
    worker_fault(tmp_path, "slow-start", "1")
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(master.reload())) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 6 and all(r.startswith("Success=1") for r in results)
    master_line = master.ctl("show proc").splitlines()[2].split()
    # Six requests, at most two reloads: the running one and one for all who waited.
    assert 1 <= int(master_line[2]) <= 2


# --- max_reloads and the two passes ---------------------------------------------------


@pytest.mark.parametrize("max_reloads", [0, 1, 3])
def test_max_reloads_signals_each_old_worker_once(master_factory, echo_backend, max_reloads):
    port = free_port()
    master = master_factory(tcp_config(port, echo_backend.address, max_reloads=max_reloads))
    held: dict[int, socket.socket] = {}
    generations: list[int] = []
    reloads = 5
    for _ in range(reloads):
        worker = master.workers()[0]
        generations.append(worker)
        # Keeps this worker busy after its soft stop.
        held[worker] = open_echo_on(port, worker, generations[:-1])
        assert master.reload().startswith("Success=1")
    sent = master.signals_sent()
    for index, pid in enumerate(generations):
        mine = [s for s, p in sent if p == pid]
        lived = reloads - index          # reloads this worker has lived through
        # Soft stop when superseded; SIGTERM once when it exceeds max_reloads.
        expected = ["SIGUSR1"] + (["SIGTERM"] if max_reloads and lived > max_reloads else [])
        assert mine == expected, (pid, lived, sent)
        assert len(mine) == len(set(mine))
    terminated = [pid for sig, pid in sent if sig == "SIGTERM"]
    wait_for(lambda: not any(pid_alive(p) for p in terminated), what="SIGTERMed workers gone")
    survivors = {p.pid: p.reloads for p in master.show_proc() if p.section == "old workers"}
    for pid, lived in survivors.items():
        assert max_reloads == 0 or lived <= max_reloads
    # An old worker still relays its connection until it is terminated.
    newest_old = generations[-1]
    held[newest_old].sendall(b"still\n")
    assert held[newest_old].recv(100) == b"still\n"
    for sock in held.values():
        sock.close()


def test_max_reloads_one_corner_single_signal_per_reload(master_factory, echo_backend):
    """max_reloads: 1 — a worker must never get SIGTERM and SIGUSR1 in the same reload."""
    port = free_port()
    master = master_factory(tcp_config(port, echo_backend.address, max_reloads=1))
    first = master.workers()[0]
    conn = open_echo(port)
    assert master.reload().startswith("Success=1")
    assert master.signals_sent() == [("SIGUSR1", first)]
    assert pid_alive(first)  # busy: finishing its connection
    second = master.workers()[0]
    conn2 = open_echo(port)
    assert master.reload().startswith("Success=1")
    # first: escalated once (reloads 2 > 1); second: soft-stopped once.
    assert master.signals_sent() == [("SIGUSR1", first), ("SIGTERM", first), ("SIGUSR1", second)]
    wait_for(lambda: not pid_alive(first), what="first worker terminated")
    conn.close()
    conn2.close()


def test_soft_stopped_worker_finishes_its_connection(master_factory, echo_backend):
    port = free_port()
    master = master_factory(tcp_config(port, echo_backend.address))
    old = master.workers()[0]
    conn = open_echo(port)
    assert master.reload().startswith("Success=1")
    time.sleep(0.3)
    assert pid_alive(old)
    conn.sendall(b"after reload\n")
    assert conn.recv(100) == b"after reload\n"
    conn.close()
    wait_for(lambda: not pid_alive(old), what="old worker to leave after its last connection")


# --- failed reloads -------------------------------------------------------------------

BAD_CONFIGS = {
    "yaml syntax": ("global:\n  workers: 1\n stray: x\n", 3, "YAML syntax error"),
    "unknown key": ("global:\n  wokers: 2\n", 2, "unknown key 'wokers'"),
    "wrong type": ("global:\n  workers: many\n", 2, "expected an integer"),
    "bad duration": ("global:\n  ready_timeout: 5 parsecs\n", 2, "duration"),
    "bad address": ("frontends:\n  - name: web\n    bind: [\"127.0.0.1:99999\"]\n"
                    "    default_backend: app\nbackends:\n  - name: app\n    servers:\n"
                    "      - {name: s1, address: \"127.0.0.1:1\"}\n", 3, "out of range"),
    "missing backend": ("frontends:\n  - name: web\n    bind: [\"127.0.0.1:1\"]\n"
                        "    default_backend: nope\nbackends:\n  - name: app\n    servers:\n"
                        "      - {name: s1, address: \"127.0.0.1:1\"}\n", 2, "'nope'"),
}


@pytest.mark.parametrize("kind", list(BAD_CONFIGS))
def test_bad_config_fails_reload_and_keeps_serving(master_factory, notify_socket, http_backend,
                                                   kind):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    workers = master.workers()
    text, line, message = BAD_CONFIGS[kind]
    master.write_config(text)
    mark = len(notify_socket.snapshot())
    answer = master.reload()
    assert answer.startswith("Success=0\n--\n"), answer
    assert f"{master.config_path}:{line}:" in answer and message in answer, answer
    ready = notify_socket.wait("READY", "1", after=mark)
    assert ready["STATUS"].startswith("Reload failed")
    assert master.workers() == workers
    assert http_get(port)[0] == 200
    assert "[failed: 1]" in master.ctl("show proc")
    assert master.signals_sent() == []
    assert "reload failed" in master.log()
    # The command-line client fails honestly too (this is what ExecReload runs).
    out = subprocess.run([sys.executable, "-m", "hapymaster", "reload", "-S", master.socket_path],
                         capture_output=True, timeout=30)
    assert out.returncode == 1 and b"Success=0" in out.stderr


def test_worker_never_ready_fails_reload(master_factory, notify_socket, http_backend, tmp_path):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], ready_timeout="1s"))
    workers = master.workers()
    worker_fault(tmp_path, "never-ready")
    mark = len(notify_socket.snapshot())
    answer = master.reload()
    assert answer.startswith("Success=0") and "not READY within 1s" in answer, answer
    assert notify_socket.wait("READY", "1", after=mark)["STATUS"].startswith("Reload failed")
    assert master.workers() == workers
    assert http_get(port)[0] == 200
    # The late worker was killed, and nothing but it was signalled.
    killed = [pid for sig, pid in master.signals_sent()]
    assert len(killed) == 1 and killed[0] not in workers
    wait_for(lambda: not pid_alive(killed[0]), what="late worker killed")
    reloads = {p.pid: p.reloads for p in master.show_proc()}
    assert reloads[workers[0]] == 0  # a failed reload is not counted against the survivors


def test_worker_exiting_at_start_fails_reload(master_factory, http_backend, tmp_path):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    workers = master.workers()
    worker_fault(tmp_path, "exit-at-start")
    answer = master.reload()
    assert answer.startswith("Success=0") and "exited before it was READY" in answer, answer
    assert master.workers() == workers and http_get(port)[0] == 200
    # Fixed: the next reload succeeds.
    (tmp_path / "hooks" / "exit-at-start").unlink()
    assert master.reload().startswith("Success=1")


def test_bind_conflict_fails_reload(master_factory, http_backend):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    master.write_config(http_config(port, [backend.address]).replace(
        f'"127.0.0.1:{port}"', f'"127.0.0.1:{port}", "127.0.0.1:{taken}"'))
    answer = master.reload()
    blocker.close()
    assert answer.startswith("Success=0") and f"cannot bind 127.0.0.1:{taken}" in answer
    assert http_get(port)[0] == 200


# --- crashes, first start, stop -----------------------------------------------------------


def test_crashed_worker_is_restarted(master_factory, http_backend):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]))
    worker = master.workers()[0]
    os.kill(worker, signal.SIGKILL)
    replacement = wait_for(lambda: [p for p in master.workers() if p != worker], what="restart")
    assert replacement
    wait_for(lambda: http_get(port)[0] == 200, what="serving again")
    log = master.log()
    assert f"worker {worker}" in log and "killed by SIGKILL" in log and "restarting" in log


def test_first_start_failure_exits_nonzero(master_factory, http_backend, tmp_path):
    backend = http_backend("a")
    worker_fault(tmp_path, "exit-at-start")
    master = master_factory(http_config(free_port(), [backend.address]), wait_ready=False)
    assert master.wait_exit(20) == 1
    assert "first start failed" in master.log()


def test_first_start_bind_failure_exits_nonzero(master_factory, http_backend):
    backend = http_backend("a")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    master = master_factory(http_config(blocker.getsockname()[1], [backend.address]),
                            wait_ready=False)
    assert master.wait_exit(20) == 1
    blocker.close()
    assert "cannot bind" in master.log()


@pytest.mark.parametrize("as_user", [False, True])
def test_master_sigkill_leaves_no_worker(master_factory, echo_backend, as_user):
    if as_user and os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    port = free_port()
    config = tcp_config(port, echo_backend.address)
    if as_user:  # the kernel clears PDEATHSIG when a process changes uid
        config = config.replace("global:\n", "global:\n  user: nobody\n  group: nogroup\n")
    master = master_factory(config)
    workers = master.workers()
    busy = open_echo(port)  # a worker finishing connections must still die with the master
    master.process.kill()
    master.process.wait(5)
    # At once, by the kernel: not after some grace period of their own.
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=3, what="workers to die")
    busy.close()


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_stop_finishes_connections_then_exits(master_factory, notify_socket, echo_backend, sig):
    port = free_port()
    master = master_factory(tcp_config(port, echo_backend.address))
    worker = master.workers()[0]
    conn = open_echo(port)
    mark = len(notify_socket.snapshot())
    os.kill(master.pid, getattr(signal, sig))
    notify_socket.wait("STOPPING", "1", after=mark)
    time.sleep(0.3)
    conn.sendall(b"in flight\n")
    assert conn.recv(100) == b"in flight\n"   # soft: the connection is finished, not cut
    with pytest.raises(OSError):            # but no new client is taken
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    conn.close()
    assert master.wait_exit(15) == 0
    assert not pid_alive(worker)


def test_stop_kills_after_hard_stop_after(master_factory, echo_backend):
    port = free_port()
    master = master_factory(tcp_config(port, echo_backend.address, hard_stop_after="1s"))
    worker = master.workers()[0]
    conn = open_echo(port)
    os.kill(master.pid, signal.SIGTERM)
    assert master.wait_exit(15) == 0
    assert ("SIGKILL", worker) in master.signals_sent()
    assert not pid_alive(worker)
    conn.close()


def test_stop_during_reload(master_factory, notify_socket, http_backend, tmp_path):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address], ready_timeout="30s"))
    worker_fault(tmp_path, "never-ready")
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", master.reload()))
    thread.start()
    wait_for(lambda: len(master.show_proc()) == 3, what="the new worker to be started")
    mark = len(notify_socket.snapshot())
    os.kill(master.pid, signal.SIGTERM)
    assert master.wait_exit(15) == 0
    thread.join(10)
    assert result["r"].startswith("Success=0")
    after = notify_socket.snapshot()[mark:]
    assert any(m.get("STOPPING") == "1" for m in after)
    assert not any(m.get("READY") == "1" for m in after), after


def test_worker_restarted_during_a_reload_leaves_after_it(master_factory, http_backend, tmp_path):
    """A current worker that dies while the next generation starts is replaced
    (the old generation still serves); once the reload is done, pass 2 must
    soft-stop that replacement too, or it would serve the old config forever."""
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], ready_timeout="30s"))
    first = master.workers()[0]
    slow = worker_fault(tmp_path, "slow-start", "3")
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", master.reload()))
    thread.start()
    wait_for(lambda: not slow.exists(), what="the new worker to be started (and slowed)")
    new = {p.pid for p in master.show_proc() if p.kind == "worker"} - {first}
    os.kill(first, signal.SIGKILL)     # its replacement starts at normal speed
    wait_for(lambda: {p.pid for p in master.show_proc() if p.kind == "worker"} - new - {first},
             what="the replacement of the killed worker")
    replacement = ({p.pid for p in master.show_proc() if p.kind == "worker"} - new).pop()
    thread.join(30)
    assert result["r"].startswith("Success=1")
    assert ("SIGUSR1", replacement) in master.signals_sent()
    wait_for(lambda: not pid_alive(replacement), what="the replacement to leave")
    assert set(master.workers()) == new and master.old_workers() == []
    assert http_get(port)[0] == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_workers_drop_privileges(master_factory, http_backend):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address],
                                        extra_global="  user: nobody\n  group: nogroup"))
    status = Path(f"/proc/{master.workers()[0]}/status").read_text()
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    gid_line = next(line for line in status.splitlines() if line.startswith("Gid:"))
    assert uid_line.split()[1:] == ["65534"] * 4 and gid_line.split()[1:] == ["65534"] * 4
    assert Path(f"/proc/{master.pid}/status").read_text().count("Uid:\t0") == 1
    assert http_get(port)[0] == 200
    assert master.reload().startswith("Success=1")


def test_watchdog(master_factory, notify_socket, http_backend):
    backend = http_backend("a")
    master_factory(http_config(free_port(), [backend.address]), env={"WATCHDOG_USEC": "400000"})
    mark = len(notify_socket.snapshot())
    notify_socket.wait("WATCHDOG", "1", after=mark, timeout=5)


def test_no_notify_socket_works_the_same(master_factory, http_backend):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]), wait_ready=False, notify=False)
    wait_for(lambda: os.path.exists(master.socket_path), what="master socket")
    wait_for(lambda: master.workers() and "READY" in master.log(), what="workers")
    assert http_get(port)[0] == 200
    assert master.reload().startswith("Success=1")


def test_no_connection_refused_across_20_reloads(master_factory, http_backend):
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2))
    stop = threading.Event()
    errors: list[str] = []
    served = [0]

    def hammer() -> None:
        while not stop.is_set():
            try:
                status, _ = http_get(port, timeout=10)
                if status != 200:
                    errors.append(f"status {status}")
                served[0] += 1
            except OSError as exc:
                errors.append(repr(exc))

    clients = [threading.Thread(target=hammer) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for _ in range(20):
            assert master.reload().startswith("Success=1")
    finally:
        stop.set()
        for thread in clients:
            thread.join(15)
    assert errors == []
    assert served[0] > 20


# --- command line -------------------------------------------------------------------------


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hapymaster", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_check_valid_config(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(http_config(8080, ["127.0.0.1:9001"]))
    out = run_cli("-c", "-f", str(path))
    assert out.returncode == 0 and out.stdout.strip() == "Configuration file is valid"


def test_check_reports_every_error_with_file_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("global:\n  workers: 0\n  max_reloadz: 1\nfrontends:\n  - name: w\n"
                    "    bind: \"nohost\"\n    default_backend: x\nbackends:\n  - name: b\n"
                    "    servers: []\n")
    out = run_cli("-c", "-f", str(path))
    assert out.returncode == 1
    errors = out.stderr.strip().splitlines()
    assert all(e.startswith(f"{path}:") for e in errors), errors
    lines = {int(e.split(":")[1]) for e in errors}
    assert {2, 3, 6, 5, 10} <= lines, errors


def test_check_missing_file(tmp_path):
    out = run_cli("-c", "-f", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "nope.yaml" in out.stderr


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("hapymaster ")


def test_reload_without_master_fails_clearly(tmp_path):
    out = run_cli("reload", "-S", str(tmp_path / "none.sock"))
    assert out.returncode == 1 and "cannot reach the master" in out.stderr


def test_ctl_command(master_factory, http_backend):
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]))
    out = run_cli("ctl", "-S", master.socket_path, "show", "proc")
    assert out.returncode == 0 and "# workers" in out.stdout
    assert "reload" in run_cli("ctl", "-S", master.socket_path, "help").stdout


# --- the master never loses track (issue 8) ----------------------------------------------


def log_ready_pids(master) -> list[int]:
    """Workers the master logged as READY, in order."""
    return [int(m.group(1)) for m in re.finditer(r"worker (\d+) \(generation \d+, #\d+\) is READY",
                                                 master.log())]


def test_concurrent_worker_commands_all_answered(master_factory, http_backend):
    """Several requests in flight on one worker's control channel: each gets its
    own reply (a reply that found its request forgotten waited the 5-s timeout
    and answered 'did not answer')."""
    backend = http_backend("a")
    master = master_factory(http_config(free_port(), [backend.address]))
    pid = master.workers()[0]
    answers: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        answer = master.ctl("@1 show info")
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(answers) == 16
    lost = [a for a in answers if f"Pid: {pid}" not in a]
    assert lost == [], lost[:3]


def test_first_start_ready_worker_dying_is_restarted(master_factory, notify_socket, http_backend,
                                                     tmp_path):
    """First start, 2 workers: one is READY (and serving) and dies while the other
    is still INIT. That is a crash of a current worker, not a failed start."""
    backend = http_backend("a")
    port = free_port()
    slow = worker_fault(tmp_path, "slow-start", "3")
    master = master_factory(http_config(port, [backend.address], workers=2), wait_ready=False)
    ready = wait_for(lambda: log_ready_pids(master), what="one worker READY")
    assert not slow.exists()      # the other one is still starting
    os.kill(ready[0], signal.SIGKILL)
    notify_socket.wait("READY", "1", timeout=20)
    assert master.process.poll() is None, master.log()
    workers = master.workers()
    assert len(workers) == 2 and ready[0] not in workers
    assert http_get(port)[0] == 200
    assert "exited before it was READY" not in master.log()


def test_restart_racing_a_reload_leaves_no_stale_worker(master_factory, http_backend, tmp_path):
    """A current worker dies while a reload runs, and the reload finishes while its
    replacement is being prepared (here: the runtime state is read from a worker
    that does not answer). The replacement must not be started for the
    superseded generation: nothing would ever signal it."""
    backend = http_backend("a")
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2, ready_timeout="30s"))
    first, second = master.workers()
    slow = worker_fault(tmp_path, "slow-start", "2")
    result: dict[str, str] = {}
    thread = threading.Thread(target=lambda: result.setdefault("r", master.reload()))
    thread.start()
    wait_for(lambda: not slow.exists(), what="the new generation to be started (one slowed)")
    # The runtime state for a replacement is read from a current worker: make
    # that read hang past the end of the reload.
    os.kill(first, signal.SIGSTOP)
    try:
        os.kill(second, signal.SIGKILL)
        thread.join(30)
        assert result["r"].startswith("Success=1"), result
        new = set(master.workers())
    finally:
        os.kill(first, signal.SIGCONT)
    assert len(new) == 2 and not new & {first, second}
    # Every worker but the new generation leaves (first was soft-stopped while stopped).
    wait_for(lambda: {p.pid for p in master.show_proc() if p.kind == "worker"} == new,
             timeout=15, what="only the new generation left")
    time.sleep(6)  # past the 5-s state read: nothing may be started for generation 1 then
    assert {p.pid for p in master.show_proc() if p.kind == "worker"} == new, master.ctl("show proc")


def _limit_fds(pid: int, spare: int) -> tuple[int, int]:
    """Let ``pid`` open only ``spare`` more file descriptors; returns the old limit."""
    used = len(os.listdir(f"/proc/{pid}/fd"))
    old = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + spare, old[1]))
    return old


def test_spawn_failure_fails_the_reload_cleanly(master_factory, notify_socket, http_backend):
    """EMFILE while starting the new generation (the master is out of file
    descriptors): the reload fails like any other, READY=1 follows RELOADING=1,
    the reload is not counted, the listener it added is closed."""
    backend = http_backend("a")
    port, extra = free_port(), free_port()
    master = master_factory(http_config(port, [backend.address]))
    workers = master.workers()
    master.write_config(http_config(port, [backend.address]).replace(
        f'bind: ["127.0.0.1:{port}"]', f'bind: ["127.0.0.1:{port}", "127.0.0.1:{extra}"]'))
    mark = len(notify_socket.snapshot())
    # One fd for reading the config (then closed), one for the new listener:
    # the socketpair for the first new worker cannot be made.
    old = _limit_fds(master.pid, 2)
    try:
        os.kill(master.pid, signal.SIGHUP)  # not the CLI: accepting it would take an fd
        notify_socket.wait("RELOADING", "1", after=mark)
        ready = notify_socket.wait("READY", "1", after=mark, timeout=15)
    finally:
        resource.prlimit(master.pid, resource.RLIMIT_NOFILE, old)
    assert ready["STATUS"].startswith("Reload failed"), ready
    assert "[failed: 1]" in master.ctl("show proc")
    assert master.workers() == workers
    assert {p.pid: p.reloads for p in master.show_proc()}[workers[0]] == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", extra), timeout=2).close()
    assert http_get(port)[0] == 200
    assert master.reload().startswith("Success=1")
    assert http_get(extra)[0] == 200


# --- counters across reloads (issue 8) ---------------------------------------------------


def stats_totals(stats_port: int) -> tuple[int, int, int]:
    """(Prometheus requests total, CSV req_tot, CSV hrsp_2xx) of frontend "web"."""
    status, metrics = http_get(stats_port, "/metrics")
    assert status == 200
    prometheus = int(re.search(r'^hapymaster_frontend_http_requests_total\{proxy="web"\} (\d+)$',
                               metrics, re.M).group(1))
    status, csv = http_get(stats_port, "/;csv")
    assert status == 200
    header = csv.splitlines()[0].lstrip("# ").split(",")
    row = next(dict(zip(header, line.split(","))) for line in csv.splitlines()
               if line.startswith("web,FRONTEND,"))
    return prometheus, int(row["req_tot"]), int(row["hrsp_2xx"])


def test_counters_continue_across_reloads(master_factory, http_backend):
    """Totals run on across reloads: what every generation served is counted,
    including a request an old, soft-stopping worker finishes after the reload,
    and no scrape ever shows less than the one before."""
    fast = http_backend("fast")
    gate = threading.Event()
    slow = http_backend("slow", gate=gate)
    port, stats = free_port(), free_port()
    config = http_config(port, [fast.address], workers=2,
                         extra_global=f'  stats: {{bind: "127.0.0.1:{stats}"}}')
    config = config.replace("    default_backend: app\n",
                            "    default_backend: app\n"
                            "    routes: [{path_prefix: /slow, backend: slow}]\n")
    config += f'  - name: slow\n    servers:\n      - {{name: z1, address: "{slow.address}"}}\n'
    master = master_factory(config)
    made = 0
    history: list[tuple[int, int, int]] = []

    def scrape() -> tuple[int, int, int]:
        totals = stats_totals(stats)
        assert not history or all(a >= b for a, b in zip(totals, history[-1])), (totals, history)
        history.append(totals)
        return totals

    for _ in range(3):
        for _ in range(4):
            assert http_get(port)[0] == 200
            made += 1
        assert scrape() == (made, made, made)
        # A request held by the current generation across the reload.
        gate.clear()
        hits = slow.server.hits
        held: dict[str, tuple[int, str]] = {}
        request = threading.Thread(target=lambda: held.setdefault("r", http_get(port, "/slow")))
        request.start()
        wait_for(lambda: slow.server.hits > hits, what="the slow request at its server")
        old = master.workers()
        assert master.reload().startswith("Success=1")
        for _ in range(3):               # the new generation serves too
            assert http_get(port)[0] == 200
            made += 1
        assert scrape() == (made, made, made)   # the slow one is not finished: not counted yet
        gate.set()
        request.join(15)
        assert held["r"][0] == 200 and held["r"][1].startswith("slow")
        made += 1
        wait_for(lambda: not any(pid_alive(p) for p in old), what="the old generation gone")
        assert scrape() == (made, made, made)
    assert len(history) == 9
