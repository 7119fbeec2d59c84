"""The master re-executing itself in place (hapymaster/reexec.py), end to end:
a real master running from a copy of the package, the code on disk changed
between reloads as an upgrade changes it, ``hapymaster reload --upgrade``,
and the NOTIFY_SOCKET harness standing in for systemd (the nspawn test does
the same under the real one)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from master_harness import (HOOKS, connection_owner, copy_of_package, free_port, http_config,
                            http_get, install_metadata, pid_alive, tcp_config, wait_for,
                            worker_fault)


def listen_inode(port: int) -> str:
    """The inode of the socket listening on 127.0.0.1:port (the same socket, or a new one)."""
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":
                return fields[9]
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def set_version(site: Path, old: str, new: str) -> None:
    init = site / "hapymaster" / "__init__.py"
    init.write_text(init.read_text().replace(f'__version__ = "{old}"', f'__version__ = "{new}"'))


def master_line(master) -> list[str]:  # type: ignore[no-untyped-def]
    text = master.ctl("show proc")
    return text.split("# master\n", 1)[1].splitlines()[0].split()


def reloads_of(master, pid: int) -> int:  # type: ignore[no-untyped-def]
    return next(p.reloads for p in master.show_proc() if p.pid == pid)


def connection_on(port: int, pid: int, pids: list[int]) -> socket.socket:
    """A client connection that worker ``pid`` serves. Just after a reload, the
    generation it replaced may still accept one before its SIGUSR1 is handled
    (it then finishes it): such a connection is closed and another one made."""
    for _ in range(100):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert echo_once(sock, b"which\n") == b"which\n"
        if connection_owner(sock, pids) == pid:
            return sock
        sock.close()
    raise AssertionError(f"no connection reached worker {pid}")


def echo_once(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += chunk
    return got


class Hammer:
    """Clients connecting continuously while the master re-executes: one
    through the proxy's listener, one to the master CLI. Every failure counts."""

    def __init__(self, port: int, cli_path: str):
        self.port, self.cli_path = port, cli_path
        self.done = threading.Event()
        self.served = {"proxy": 0, "cli": 0}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._proxy, daemon=True),
                        threading.Thread(target=self._cli, daemon=True)]
        for thread in self.threads:
            thread.start()

    def _proxy(self) -> None:
        while not self.done.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                    if echo_once(sock, b"ping\n") != b"ping\n":
                        raise OSError("short echo")
                self.served["proxy"] += 1
            except OSError as exc:
                self.failures.append(f"proxy: {exc!r}")

    def _cli(self) -> None:
        from hapymaster.mclient import client
        while not self.done.is_set():
            try:
                answer = client(self.cli_path, "show version", timeout=10)
                if not answer.strip():
                    raise OSError("empty answer")
                self.served["cli"] += 1
            except OSError as exc:
                self.failures.append(f"cli: {exc!r}")

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(15)


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``hapymaster ARGS`` as ExecReload= runs it, with the code on disk."""
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "hapymaster", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_reload_upgrade_reexecutes_the_master_in_place(master_factory, echo_backend,
                                                       notify_socket, tmp_path):
    site = copy_of_package(tmp_path)
    port = free_port()
    # max_reloads 1: the carried generation 1 is over it at the reload that follows.
    master = master_factory(tcp_config(port, echo_backend.address, max_reloads=1),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    listener, cli_inode = listen_inode(port), os.stat(master.socket_path).st_ino
    [first] = master.workers()
    held_first = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert echo_once(held_first, b"one\n") == b"one\n"
    assert master.reload().startswith("Success=1")
    [second] = master.workers()
    held_second = connection_on(port, second, [first, second])
    assert echo_once(held_second, b"two\n") == b"two\n"
    assert master.signals_sent() == [("SIGUSR1", first)]
    assert reloads_of(master, first) == 1 and reloads_of(master, second) == 0
    assert master_line(master)[-1] == "0.1.0"

    set_version(site, "0.1.0", "0.1.9")   # the code on disk changes
    mark = len(notify_socket.snapshot())
    hammer = Hammer(port, master.socket_path)
    try:
        wait_for(lambda: hammer.served["proxy"] > 5 and hammer.served["cli"] > 5,
                 what="the clients to run")
        result = run_cli(site, "reload", "--upgrade", "-S", master.socket_path)
        served = dict(hammer.served)
        wait_for(lambda: all(hammer.served[k] > served[k] + 5 for k in served),
                 what="the clients to be served by the new image")
    finally:
        hammer.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("Success=1\n--\n"), result.stdout
    log = master.log()
    assert "re-executing the master in place (reload --upgrade)" in log
    assert "re-executed in place: hapymaster 0.1.9 took over from 0.1.0" in log
    assert hammer.failures == [], hammer.failures[:5]

    # Same process, new code; same listening sockets; the CLI on the same file.
    assert master.process.poll() is None
    line = master_line(master)
    assert int(line[0]) == master.pid and line[-1] == "0.1.9", line
    assert line[2] == "2" and line[4] == "0]", line   # 2 reloads, none failed
    assert listen_inode(port) == listener
    assert os.stat(master.socket_path).st_ino == cli_inode
    assert "Version: 0.1.9\n" in master.ctl("@1 show info")
    [third] = master.workers()
    assert third not in (first, second)

    # The carried workers, counted once more by the reload after the exec:
    # generation 1 (2 reloads > max_reloads 1) gets SIGTERM, once, in pass 1;
    # generation 2 its SIGUSR1 in pass 2; nothing twice.
    assert sorted(master.signals_sent()) == sorted([("SIGUSR1", first), ("SIGTERM", first),
                                                    ("SIGUSR1", second)])
    wait_for(lambda: not pid_alive(first), what="generation 1 to leave on SIGTERM")
    assert reloads_of(master, second) == 1 and pid_alive(second)
    assert echo_once(held_second, b"still\n") == b"still\n"   # soft-stopped: it finishes
    held_first.close()
    held_second.close()
    wait_for(lambda: not pid_alive(second), what="generation 2 to leave once idle")

    # systemd heard one reload: RELOADING=1 with MONOTONIC_USEC, then READY=1
    # from the new image; never another MAINPID.
    after = notify_socket.snapshot()[mark:]
    reloading = next(i for i, m in enumerate(after) if m.get("RELOADING") == "1")
    assert "MONOTONIC_USEC" in after[reloading]
    ready = [m for m in after[reloading:] if m.get("READY") == "1"]
    assert ready and ready[0]["STATUS"].startswith("Ready: generation 3"), after
    assert all(m["MAINPID"] == str(master.pid) for m in notify_socket.snapshot()
               if "MAINPID" in m)

    # The new image reloads as the old one did.
    assert master.reload().startswith("Success=1")
    assert master_line(master)[2] == "3"


def test_reload_reexecutes_when_the_installed_version_changed(master_factory, http_backend,
                                                             tmp_path):
    backend = http_backend("s1")
    site = copy_of_package(tmp_path)
    install_metadata(site, "0.1.0")
    port = free_port()
    master = master_factory(http_config(port, [backend.address]),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    # Nothing installed changed: a reload is a reload.
    assert master.reload().startswith("Success=1")
    assert "re-executing" not in master.log()
    # apt upgrade: new code and new metadata; then a plain `systemctl reload`.
    set_version(site, "0.1.0", "0.2.0")
    install_metadata(site, "0.2.0")
    answer = master.reload()
    assert answer.startswith("Success=1"), answer
    assert "the installed version changed (0.1.0 -> 0.2.0)" in master.log()
    line = master_line(master)
    assert int(line[0]) == master.pid and line[-1] == "0.2.0", line
    assert http_get(port)[0] == 200
    # Once: the next reload finds the version it runs.
    assert master.reload().startswith("Success=1")
    assert master.log().count("re-executing the master in place") == 1


def test_broken_new_code_fails_the_upgrade_and_the_old_master_goes_on(
        master_factory, http_backend, notify_socket, tmp_path):
    backend = http_backend("s1")
    site = copy_of_package(tmp_path)
    port = free_port()
    master = master_factory(http_config(port, [backend.address], workers=2),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    old = master.workers()
    # A broken upgrade of the master's own code (not the workers').
    mcli = site / "hapymaster" / "mcli.py"
    good = mcli.read_text()
    mcli.write_text(good + "\ndef broken(:\n")
    line = good.count("\n") + 2
    mark = len(notify_socket.snapshot())
    result = run_cli(site, "reload", "--upgrade", "-S", master.socket_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("Success=0\n--\n"), result.stderr
    assert f"re-exec failed: {mcli}:{line}: SyntaxError" in result.stderr, result.stderr
    assert "the master keeps running 0.1.0" in result.stderr
    after = notify_socket.wait("READY", "1", after=mark)
    assert after["STATUS"].startswith("Reload failed: re-exec failed"), after
    assert "took over" not in master.log()
    assert master.workers() == old and http_get(port)[0] == 200
    assert "[failed: 1]" in master.ctl("show proc")
    # The old master still reloads; fixed on disk, the upgrade goes through.
    assert master.reload().startswith("Success=1")
    mcli.write_text(good)
    result = run_cli(site, "reload", "--upgrade", "-S", master.socket_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "took over" in master.log() and http_get(port)[0] == 200
    assert master_line(master)[0] == str(master.pid)


def test_sigterm_between_the_two_images_is_handled_by_the_new_one(master_factory, http_backend,
                                                                 tmp_path):
    """A stop that comes while the master is between images (the new one still
    starting) neither kills it half-way nor is lost: the signals are blocked
    across the execve, and the new image handles them once it can."""
    backend = http_backend("s1")
    site = copy_of_package(tmp_path)
    master = master_factory(http_config(free_port(), [backend.address]),
                            env={"PYTHONPATH": f"{HOOKS}{os.pathsep}{site}"})
    [worker] = master.workers()
    worker_fault(tmp_path, "reexec-slow-start", "2")
    upgrade = subprocess.Popen([sys.executable, "-m", "hapymaster", "reload", "--upgrade", "-S",
                                master.socket_path], env=dict(os.environ, PYTHONPATH=str(site)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def exec_done() -> bool:   # the environment the new image was started with
        with open(f"/proc/{master.pid}/environ", "rb") as environ:
            return b"HAPYMASTER_REEXEC_FD=" in environ.read()
    wait_for(exec_done, what="the execve")
    os.kill(master.pid, signal.SIGTERM)
    assert master.wait_exit(30) == 0, master.log()
    log = master.log()
    assert "re-executed in place" in log and "stopping (SIGTERM)" in log, log
    wait_for(lambda: not pid_alive(worker), what="the worker to leave")
    out, err = upgrade.communicate(timeout=30)
    assert upgrade.returncode == 1 and "the master is stopping" in err, (out, err)
