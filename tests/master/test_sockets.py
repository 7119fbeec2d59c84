"""Socket activation, the fd store and EXTEND_TIMEOUT_USEC, with the test playing systemd.

The harness does what systemd does, exactly enough for the master's side:
the passed sockets on fds 3.. with LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES (as
for a .socket unit, or for what the fd store passes back on a restart), and a
NOTIFY_SOCKET that keeps the fds sent with FDSTORE=1 under their FDNAME and
closes them on FDSTOREREMOVE=1 (as with FileDescriptorStoreMax=). The same
behaviour under the real systemd is tests/system's.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import pytest

from hapymaster.config import parse_config
from hapymaster.sockets import Passed, SocketError, match_passed
from master_harness import ROOT, free_port, http_get, pid_alive, wait_for, worker_fault


def config(frontends: list[tuple[str, list[int]]], servers: list[str], *, stats: int | None = None,
           ready_timeout: str = "10s", hard_stop_after: str = "10s") -> str:
    server_lines = "\n".join(
        f'      - {{name: s{i}, address: "{address}"}}' for i, address in enumerate(servers, 1))
    frontend_lines = "\n".join(
        f"  - name: {name}\n"
        f"    bind: [{', '.join(f'{chr(34)}127.0.0.1:{port}{chr(34)}' for port in ports)}]\n"
        f"    default_backend: app"
        for name, ports in frontends)
    stats_line = f'  stats: {{bind: "127.0.0.1:{stats}"}}\n' if stats else ""
    return f"""\
global:
  ready_timeout: {ready_timeout}
  hard_stop_after: {hard_stop_after}
{stats_line}defaults:
  mode: http
  timeout: {{connect: 2s, client: 30s, server: 30s}}
frontends:
{frontend_lines}
backends:
  - name: app
    servers:
{server_lines}
"""


def listening(port: int) -> socket.socket:
    """A listening socket as a .socket unit's ListenStream=127.0.0.1:PORT makes it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def store_holds(notify_socket, *names: str) -> None:
    """Wait until the store is exactly ``names``: the harness reads NOTIFY_SOCKET in a
    thread, so a datagram sent before the master's answer may not be read yet."""
    wait_for(lambda: sorted(notify_socket.store()) == sorted(names), 10,
             f"the fd store to hold {names}")


def worker_environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        items = handle.read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in items if b"=" in item)


def test_passed_socket_serves_clients_that_connected_before_the_start(
        master_factory, http_backend, tmp_path):
    backend = http_backend("s1")
    port = free_port()
    sock = listening(port)
    # The client connects while no master runs: the socket unit's backlog holds it.
    early = socket.create_connection(("127.0.0.1", port), timeout=20)
    early.sendall(b"GET /early HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    master = master_factory(config([("web", [port])], [backend.address]),
                            listen=[(sock, "hapymaster.socket")])
    answer = b""
    while chunk := early.recv(65536):
        answer += chunk
    early.close()
    assert answer.startswith(b"HTTP/1.1 200") and b"s1 /early" in answer
    assert http_get(port)[0] == 200
    assert "from a socket unit" in master.log()
    # Workers must never think systemd's sockets are theirs to take.
    for pid in master.workers():
        assert not {"LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"} & set(worker_environ(pid))
    sock.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None,
                    reason="systemd-socket-activate (package systemd) is not installed")
def test_started_by_systemd_socket_activate_on_the_first_connection(http_backend, notify_socket,
                                                                    tmp_path):
    """systemd's own code sets LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES here, and
    starts the master when the first client connects, as a .socket unit does."""
    backend = http_backend("s1")
    port = free_port()
    config_path = tmp_path / "hapymaster.yaml"
    config_path.write_text(config([("web", [port])], [backend.address]))
    log_path = tmp_path / "activate.log"
    env = {"PYTHONPATH": str(ROOT), "NOTIFY_SOCKET": notify_socket.path,
           "PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=web",
             "-E", "PYTHONPATH", "-E", "NOTIFY_SOCKET", sys.executable, "-m", "hapymaster",
             "-f", str(config_path), "-S", str(tmp_path / "master.sock")],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: b"Listening on" in log_path.read_bytes(), 10, "the socket to listen")
        assert not notify_socket.snapshot()   # no master yet: the client starts it
        assert http_get(port, "/first", timeout=30)[1].startswith("s1 /first")
        notify_socket.wait("READY", "1")
        assert b"passed from a socket unit" in log_path.read_bytes()
    finally:
        process.send_signal(signal.SIGTERM)   # the same pid: it execs the master
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def test_passed_sockets_match_by_name_for_frontends_and_stats(master_factory, http_backend):
    backend = http_backend("s1")
    web, api, api_passed, stats, stats_passed = (free_port() for _ in range(5))
    web_sock, api_sock, stats_sock = listening(web), listening(api_passed), listening(stats_passed)
    master_factory(config([("web", [web]), ("api", [api])], [backend.address], stats=stats),
                   listen=[(web_sock, "hapymaster.socket"), (api_sock, "api"),
                           (stats_sock, "stats")])
    assert http_get(web, "/w")[1].startswith("s1 /w")
    # FileDescriptorName=api stands in for frontend api's bind, which the
    # master then does not bind itself.
    assert http_get(api_passed, "/a")[1].startswith("s1 /a")
    assert refused(api)
    status, csv = http_get(stats_passed, "/;csv")
    assert status == 200 and "api" in csv
    assert refused(stats)
    for sock in (web_sock, api_sock, stats_sock):
        sock.close()


def test_passed_socket_that_no_bind_matches_fails_the_start(master_factory, http_backend,
                                                             notify_socket):
    backend = http_backend("s1")
    port, stray = free_port(), free_port()
    sock = listening(stray)
    text = config([("web", [port])], [backend.address])
    master = master_factory(text, wait_ready=False, listen=[(sock, "foo")])
    assert master.wait_exit() != 0
    where = f"{master.config_path}:{line_of(text, '- name: web')}"
    assert (f"{where}: systemd passed a socket on 127.0.0.1:{stray} (FileDescriptorName=foo) "
            f"that no frontend binds") in master.log()
    assert not any(m.get("READY") == "1" for m in notify_socket.snapshot())
    sock.close()


def test_passed_socket_that_is_not_listening_fails_the_start(master_factory, http_backend):
    backend = http_backend("s1")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    master = master_factory(config([("web", [free_port()])], [backend.address]),
                            wait_ready=False, listen=[(udp, "web")])
    assert master.wait_exit() != 0
    assert "systemd passed fd 3 (FileDescriptorName=web), which is not a listening TCP socket" \
        in master.log()
    udp.close()


@dataclass
class Prober:
    """One client after another on ``port``, each a full HTTP request, until stopped.

    Connections made while no master runs count apart (``while_down``): they
    prove clients were waiting in the backlog, not just lucky in the timing.
    A failure records when its connection was made (``failed_at``, monotonic),
    so a test can tell the request a crash cut (connected before it) from a
    client refused or dropped afterwards.
    """
    port: int
    down: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    connected_while_down: threading.Event = field(default_factory=threading.Event)
    served: int = 0
    while_down: int = 0
    failures: list[str] = field(default_factory=list)
    failed_at: list[float] = field(default_factory=list)
    served_at: list[float] = field(default_factory=list)

    def run(self) -> None:
        while not self.stop.is_set() and len(self.failures) < 5:
            started = time.monotonic()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
                    was_down = self.down.is_set()
                    if was_down:
                        self.connected_while_down.set()
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    answer = b""
                    while chunk := sock.recv(65536):
                        answer += chunk
                if not answer.startswith(b"HTTP/1.1 200"):
                    self.failures.append(f"answer {answer[:40]!r}")
                    self.failed_at.append(started)
                    continue
                self.served += 1
                self.served_at.append(started)
                self.while_down += was_down
            except OSError as exc:
                self.failures.append(repr(exc))
                self.failed_at.append(started)
            time.sleep(0.01)


def kill_master(master, sig: signal.Signals = signal.SIGKILL) -> None:
    """SIGKILL: a crash, the workers die with the master (PR_SET_PDEATHSIG).
    SIGTERM: the stop half of ``systemctl restart``, the workers drain and exit."""
    workers = master.workers()
    os.kill(master.pid, sig)
    master.process.wait(20)
    wait_for(lambda: not any(pid_alive(pid) for pid in workers), 10, "the workers to exit")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["crash", "restart"])
def test_fd_store_keeps_clients_waiting_through_a_master_crash_or_restart(
        master_factory, http_backend, notify_socket, sig):
    backend = http_backend("s1")
    port, stats = free_port(), free_port()
    text = config([("web", [port])], [backend.address], stats=stats)
    first = master_factory(text, env={"FDSTORE": "16"})
    store_holds(notify_socket, f"hapy-127.0.0.1-{port}", f"hapy-127.0.0.1-{stats}")
    store = notify_socket.store()
    assert store[f"hapy-127.0.0.1-{port}"].getsockname() == ("127.0.0.1", port)
    prober = Prober(port)
    thread = threading.Thread(target=prober.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: prober.served >= 5, 20, "requests before the crash")
        prober.down.set()
        kill_master(first, sig)
        dead = time.monotonic()   # the master and its workers are gone
        # systemd would now start the service again (the restart job, or
        # Restart=on-failure) and pass the stored sockets back; a client
        # connects meanwhile and waits.
        wait_for(prober.connected_while_down.is_set, 20, "a client to connect while down")
        stored_before = len([m for m in notify_socket.snapshot() if m.get("FDSTORE") == "1"])
        after = len(notify_socket.snapshot())
        second = master_factory(text, env={"FDSTORE": "16"}, wait_ready=False,
                                listen=[(sock, name) for name, sock in store.items()])
        notify_socket.wait("READY", "1", after=after, timeout=20)
        prober.down.clear()
        served = prober.served
        wait_for(lambda: prober.served >= served + 5, 20, "requests after the restart")
    finally:
        prober.stop.set()
        thread.join(40)
    failures = prober.failures
    if sig == signal.SIGKILL:
        # A crash SIGKILLs the workers with the master (PDEATHSIG): a request a
        # worker held then is lost with it, as with any proxy that crashes.
        # What must hold: nobody refused, ever, and every client that came
        # once the workers were gone waited in the backlog and was served.
        failures = [f for f, at in zip(failures, prober.failed_at)
                    if at >= dead or "Refused" in f]
        assert any(at >= dead for at in prober.served_at)
    assert failures == []
    assert prober.while_down >= 1
    # A stop (the first half of a restart) keeps the store as it was.
    assert not any("FDSTOREREMOVE" in m for m in notify_socket.snapshot())
    assert "from the fd store" in second.log()
    # What came back is still in the store: not sent again.
    assert len([m for m in notify_socket.snapshot() if m.get("FDSTORE") == "1"]) == stored_before


def test_without_fd_store_a_master_crash_refuses_clients(master_factory, http_backend,
                                                         notify_socket):
    """The control for the test above: the same crash, no store, refused clients."""
    backend = http_backend("s1")
    port = free_port()
    first = master_factory(config([("web", [port])], [backend.address]))
    assert http_get(port)[0] == 200
    kill_master(first)
    assert notify_socket.store() == {}
    assert refused(port)


def test_fd_store_follows_reloads(master_factory, http_backend, notify_socket, tmp_path):
    backend = http_backend("s1")
    one, two, three = free_port(), free_port(), free_port()
    master = master_factory(config([("web", [one])], [backend.address]), env={"FDSTORE": "16"})
    store_holds(notify_socket, f"hapy-127.0.0.1-{one}")
    # The store is the master's: a worker has no business with FDSTORE.
    assert all("FDSTORE" not in worker_environ(pid) for pid in master.workers())

    master.write_config(config([("web", [one, two])], [backend.address]))
    assert "Success=1" in master.reload()
    store_holds(notify_socket, f"hapy-127.0.0.1-{one}", f"hapy-127.0.0.1-{two}")

    # A failed reload takes back the socket it added: systemd must not keep
    # the port bound for a config that never served.
    worker_fault(tmp_path, "exit-at-start")
    master.write_config(config([("web", [one, two, three])], [backend.address]))
    assert "Success=0" in master.reload()
    (tmp_path / "hooks" / "exit-at-start").unlink()
    notify_socket.wait("FDSTOREREMOVE", "1")
    store_holds(notify_socket, f"hapy-127.0.0.1-{one}", f"hapy-127.0.0.1-{two}")
    assert refused(three)

    master.write_config(config([("web", [two])], [backend.address]))
    assert "Success=1" in master.reload()
    store_holds(notify_socket, f"hapy-127.0.0.1-{two}")
    wait_for(lambda: refused(one), 10, f"127.0.0.1:{one} to be closed by everyone")
    assert http_get(two)[0] == 200


def test_stored_socket_the_config_dropped_is_closed_and_removed(master_factory, http_backend,
                                                                notify_socket):
    backend = http_backend("s1")
    port, dropped = free_port(), free_port()
    old = listening(dropped)
    master = master_factory(config([("web", [port])], [backend.address]), env={"FDSTORE": "16"},
                            listen=[(old, f"hapy-127.0.0.1-{dropped}")])
    assert http_get(port)[0] == 200
    assert any(m.get("FDSTOREREMOVE") == "1" and m.get("FDNAME") == f"hapy-127.0.0.1-{dropped}"
               for m in notify_socket.snapshot())
    assert "which the config no longer binds" in master.log()
    old.close()   # systemd's copy, closed on FDSTOREREMOVE=1: now nobody holds it
    assert refused(dropped)


def test_extend_timeout_covers_the_first_start_and_the_stop(master_factory, http_backend,
                                                            notify_socket):
    backend = http_backend("s1")
    master = master_factory(config([("web", [free_port()])], [backend.address],
                                   ready_timeout="120s", hard_stop_after="200s"))
    messages = notify_socket.snapshot()
    ready = next(i for i, m in enumerate(messages) if m.get("READY") == "1")
    start = [int(m["EXTEND_TIMEOUT_USEC"]) for m in messages[:ready]
             if "EXTEND_TIMEOUT_USEC" in m]
    # At least the master's own bound, ready_timeout: systemd's default
    # TimeoutStartSec=90s would kill a start the config allows 120s.
    assert start and start[0] >= 120_000_000
    master.process.send_signal(signal.SIGTERM)
    stopping = notify_socket.wait("STOPPING", "1")
    after = notify_socket.snapshot().index(stopping)
    extend = notify_socket.wait("EXTEND_TIMEOUT_USEC", after=after)
    assert int(extend["EXTEND_TIMEOUT_USEC"]) >= 200_000_000
    assert master.wait_exit() == 0


def test_failed_start_leaves_the_stored_sockets_in_the_store(master_factory, http_backend,
                                                             notify_socket):
    backend = http_backend("s1")
    port, taken = free_port(), free_port()
    stored = listening(port)
    squatter = listening(taken)   # the master's own bind of this one fails
    master = master_factory(config([("web", [port, taken])], [backend.address]),
                            env={"FDSTORE": "16"}, wait_ready=False,
                            listen=[(stored, f"hapy-127.0.0.1-{port}")])
    assert master.wait_exit() != 0
    assert f"cannot bind 127.0.0.1:{taken}" in master.log()
    # The next master (Restart=on-failure) must find it in the store still.
    # STATUS=Start failed comes after anything the failed start sent.
    wait_for(lambda: any(m.get("STATUS", "").startswith("Start failed")
                         for m in notify_socket.snapshot()), 10, "STATUS=Start failed")
    assert not any("FDSTOREREMOVE" in m for m in notify_socket.snapshot())
    stored.close()
    squatter.close()


# --- matching, in process: the edges of match_passed ------------------------------


def test_matching_prefers_the_socket_unit_and_names_fill_binds_in_order():
    a, b, c = (free_port() for _ in range(3))
    parsed = parse_config(config([("web", [a, b]), ("api", [c])], ["127.0.0.1:1"]), "t.yaml")
    unit_a = listening(a)
    stored_a = socket.socket(fileno=os.dup(unit_a.fileno()))   # the store's copy of a
    named_web, named_api = listening(free_port()), listening(free_port())
    matched, stale = match_passed(
        [Passed(stored_a, f"hapy-127.0.0.1-{a}"), Passed(unit_a, "hapymaster.socket"),
         Passed(named_web, "web"), Passed(named_api, "api")], parsed)
    by_port = {address.port: item for address, item in matched.items()}
    assert by_port[a].name == "hapymaster.socket"
    assert by_port[b].sock is named_web and by_port[c].sock is named_api
    assert [item.name for item in stale] == [f"hapy-127.0.0.1-{a}"]
    for sock in (unit_a, stored_a, named_web, named_api):
        sock.close()


def test_matching_too_many_sockets_for_a_name_is_an_error_at_the_frontend():
    text = config([("web", [free_port()])], ["127.0.0.1:1"])
    parsed = parse_config(text, "t.yaml")
    one, two = listening(free_port()), listening(free_port())
    with pytest.raises(SocketError) as failure:
        match_passed([Passed(one, "web"), Passed(two, "web")], parsed)
    assert failure.value.errors == [
        f"t.yaml:{line_of(text, '- name: web')}: systemd passed a socket on "
        f"127.0.0.1:{two.getsockname()[1]} (FileDescriptorName=web) that no frontend binds "
        f"(every bind of 'web' has its socket already)"]
    one.close()
    two.close()
