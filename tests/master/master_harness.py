"""Fixtures that run the real thing: a master subprocess, a NOTIFY_SOCKET the
test owns, real backends on 127.0.0.1, the master CLI, real signals."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator

import pytest

from hapymaster.mclient import client

ROOT = Path(__file__).resolve().parents[2]
HOOKS = Path(__file__).resolve().parent / "hooks"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.02) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """True if the process exists and is not a zombie waiting for a reaper."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def connection_owner(sock: socket.socket, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the proxy's end of the client connection ``sock``."""
    client = sock.getsockname()[1]
    server = sock.getpeername()[1]
    wanted = f"0100007F:{server:04X} 0100007F:{client:04X}"
    inode = None
    with open("/proc/net/tcp") as table:
        for line in table:
            fields = line.split()
            if f"{fields[1]} {fields[2]}" == wanted:
                inode = fields[9]
                break
    if inode is None:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    return None


class NotifySocket:
    """A unix datagram socket standing in for systemd's NOTIFY_SOCKET.

    Like systemd with FileDescriptorStoreMax=, it keeps the fds that come with
    ``FDSTORE=1`` (SCM_RIGHTS) under their FDNAME, and closes them on
    ``FDSTOREREMOVE=1``: ``stored`` is what systemd would pass the next master.
    """

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.messages: list[dict[str, str]] = []
        self.raw: list[str] = []
        self.stored: dict[str, socket.socket] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 65536, 16)
            except OSError:
                return
            text = data.decode()
            fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
            with self._lock:
                self.raw.append(text)
                self.messages.append(fields)
                if fields.get("FDSTORE") == "1" and len(fds) == 1:
                    old = self.stored.pop(fields.get("FDNAME", "stored"), None)
                    if old is not None:
                        old.close()
                    self.stored[fields.get("FDNAME", "stored")] = socket.socket(fileno=fds[0])
                    fds = []
                elif fields.get("FDSTOREREMOVE") == "1":
                    old = self.stored.pop(fields.get("FDNAME", ""), None)
                    if old is not None:
                        old.close()
            for fd in fds:
                os.close(fd)

    def store(self) -> dict[str, socket.socket]:
        with self._lock:
            return dict(self.stored)

    def snapshot(self) -> list[dict[str, str]]:
        with self._lock:
            return list(self.messages)

    def wait(self, key: str, value: str | None = None, after: int = 0,
             timeout: float = 15.0) -> dict[str, str]:
        """Wait for a message (at index >= after) carrying key[=value]."""
        def found() -> dict[str, str] | None:
            for message in self.snapshot()[after:]:
                if key in message and (value is None or message[key] == value):
                    return message
            return None
        return wait_for(found, timeout, f"{key}={value} on NOTIFY_SOCKET")  # type: ignore[return-value]

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            for sock in self.stored.values():
                sock.close()
            self.stored.clear()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    yield ns
    ns.close()


class _NamedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802
        server = self.server
        server.hits += 1  # type: ignore[attr-defined]
        if server.gate is not None:  # type: ignore[attr-defined]
            server.gate.wait(30)  # type: ignore[attr-defined]
        if server.delay:  # type: ignore[attr-defined]
            time.sleep(server.delay)  # type: ignore[attr-defined]
        body = f"{server.name} {self.path} xff={self.headers.get('X-Forwarded-For', '-')}\n".encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class Backend:
    name: str
    port: int
    server: socketserver.BaseServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def http_backend() -> Iterator[Callable[..., Backend]]:
    """Start named HTTP backends on 127.0.0.1: ``http_backend("s1", delay=0.5)``;
    with ``gate=threading.Event()`` every answer waits until the test sets it."""
    started: list[Backend] = []

    def start(name: str, delay: float = 0.0, gate: threading.Event | None = None) -> Backend:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _NamedHandler)
        server.daemon_threads = True
        server.name = name  # type: ignore[attr-defined]
        server.delay = delay  # type: ignore[attr-defined]
        server.hits = 0  # type: ignore[attr-defined]  # requests received, answered or not
        server.gate = gate  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        backend = Backend(name, server.server_address[1], server)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        backend.server.shutdown()
        backend.server.server_close()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while True:
            data = self.request.recv(65536)
            if not data:
                return
            self.request.sendall(data)


@pytest.fixture
def echo_backend() -> Iterator[Backend]:
    """A TCP echo server: long-lived tcp-mode connections keep old workers busy."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _EchoHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield Backend("echo", server.server_address[1], server)
    server.shutdown()
    server.server_close()


def http_get(port: int, path: str = "/", timeout: float = 5.0) -> tuple[int, str]:
    """One HTTP/1.1 request on a fresh connection; returns (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head else 0
    return status, body.decode(errors="replace")


@dataclass
class Proc:
    pid: int
    kind: str
    reloads: int
    section: str


@dataclass
class MasterProcess:
    process: subprocess.Popen[bytes]
    config_path: Path
    socket_path: str
    log_path: Path
    notify: NotifySocket | None
    seen_pids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.process.pid

    def ctl(self, command: str, timeout: float = 30.0) -> str:
        return client(self.socket_path, command, timeout=timeout)

    def show_proc(self) -> list[Proc]:
        procs, section = [], "master"
        for line in self.ctl("show proc").splitlines():
            if line.startswith("# "):
                section = line[2:].strip()
                continue
            if line.startswith("#") or not line.strip():
                continue
            parts = line.split()
            procs.append(Proc(int(parts[0]), parts[1], int(parts[2]), section))
        self.seen_pids.update(p.pid for p in procs if p.kind == "worker")
        return procs

    def workers(self) -> list[int]:
        return [p.pid for p in self.show_proc() if p.section == "workers"]

    def old_workers(self) -> list[int]:
        return [p.pid for p in self.show_proc() if p.section == "old workers"]

    def write_config(self, text: str) -> None:
        self.config_path.write_text(textwrap.dedent(text))

    def reload(self, hard: bool = False) -> str:
        return self.ctl("hard-reload" if hard else "reload")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signals_sent(self) -> list[tuple[str, int]]:
        """(signal, pid) for every signal the master says it sent a worker."""
        return [(m.group(1), int(m.group(2)))
                for m in re.finditer(r"sending (SIG\w+) to worker (\d+)", self.log())]

    def wait_exit(self, timeout: float = 20.0) -> int:
        return self.process.wait(timeout)


# How systemd starts a socket-activated service: the passed sockets as fds
# 3.., LISTEN_FDS/LISTEN_FDNAMES, and LISTEN_PID set to the pid of the process
# that will read them, which only that process knows; so a tiny wrapper sets
# it and execs the master (same pid). The test's sockets come in on fds >= 100
# so that moving them to 3.. never overwrites one not moved yet.
_LISTEN_WRAPPER = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, 3):
    os.dup2(fd, target)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""
PASSED_FD_BASE = 100


@pytest.fixture
def master_factory(tmp_path: Path, notify_socket: NotifySocket) -> Iterator[Callable[..., MasterProcess]]:
    """Start masters: ``master_factory(config_text, env={...}, wait_ready=True)``."""
    started: list[MasterProcess] = []

    def start(config: str, *, env: dict[str, str] | None = None, wait_ready: bool = True,
              notify: bool = True, name: str = "hapymaster.yaml",
              listen: list[tuple[socket.socket, str]] | None = None) -> MasterProcess:
        """``listen``: sockets and their FileDescriptorName=, passed as systemd would."""
        config_path = tmp_path / name
        config_path.write_text(textwrap.dedent(config))
        socket_path = str(tmp_path / f"master-{len(started)}.sock")
        log_path = tmp_path / f"master-{len(started)}.log"
        environment = {k: v for k, v in os.environ.items()
                       if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID",
                                    "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID",
                                    "LISTEN_FDNAMES", "FDSTORE")}
        environment["PYTHONPATH"] = os.pathsep.join(
            [str(HOOKS), str(ROOT)] + ([environment["PYTHONPATH"]] if "PYTHONPATH" in environment else []))
        environment["HAPYMASTER_TEST_HOOKS"] = str(tmp_path / "hooks")
        if notify:
            environment["NOTIFY_SOCKET"] = notify_socket.path
        environment.update(env or {})
        command = [sys.executable, "-m", "hapymaster", "-f", str(config_path), "-S", socket_path]
        passed: list[int] = []
        if listen:
            passed = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, PASSED_FD_BASE)
                      for sock, _ in listen]
            environment["LISTEN_FDS"] = str(len(listen))
            environment["LISTEN_FDNAMES"] = ":".join(fd_name for _, fd_name in listen)
            command = [sys.executable, "-c", _LISTEN_WRAPPER,
                       ",".join(map(str, passed)), *command[1:]]
        log_file = open(log_path, "wb")
        try:
            process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=environment, cwd=str(tmp_path), pass_fds=passed)
        finally:
            log_file.close()
            for fd in passed:
                os.close(fd)
        handle = MasterProcess(process, config_path, socket_path, log_path,
                               notify_socket if notify else None)
        started.append(handle)
        if wait_ready:
            try:
                notify_socket.wait("READY", "1", timeout=20)
                handle.show_proc()
            except AssertionError:
                raise AssertionError("master not READY; its log:\n" + handle.log()) from None
        return handle

    yield start
    for handle in started:
        if handle.process.poll() is None:
            try:
                handle.show_proc()
            except OSError:
                pass
            handle.process.send_signal(signal.SIGTERM)
            try:
                handle.process.wait(15)
            except subprocess.TimeoutExpired:
                handle.process.kill()
                handle.process.wait(5)
        for pid in handle.seen_pids:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)


def worker_fault(tmp_path: Path, name: str, content: str = "") -> Path:
    """Switch on a worker-side fault for workers started from now on (see hooks/)."""
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    path = hooks / name
    path.write_text(content)
    return path


def copy_of_package(tmp_path: Path) -> Path:
    """hapymaster copied under tmp_path, for a master started with it on PYTHONPATH:
    the test can then change the code on disk as a package upgrade would."""
    top = tmp_path / "site"
    shutil.copytree(ROOT / "hapymaster", top / "hapymaster",
                    ignore=shutil.ignore_patterns("__pycache__"))
    return top


def install_metadata(site: Path, version: str) -> None:
    """What dpkg leaves next to the package: the old *.dist-info gone, one named
    after the new version (what importlib.metadata reads)."""
    for old in site.glob("hapymaster-*.dist-info"):
        for item in old.iterdir():
            item.unlink()
        old.rmdir()
    info = site / f"hapymaster-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: hapymaster\nVersion: {version}\n")


# --- configs -----------------------------------------------------------------


def http_config(port: int, servers: list[str], *, max_reloads: int = 50, workers: int = 1,
                ready_timeout: str = "10s", hard_stop_after: str = "10s", extra_global: str = "") -> str:
    server_lines = "\n".join(
        f'      - {{name: s{i}, address: "{address}"}}' for i, address in enumerate(servers, 1))
    return f"""\
global:
  max_reloads: {max_reloads}
  workers: {workers}
  ready_timeout: {ready_timeout}
  hard_stop_after: {hard_stop_after}
{extra_global}
defaults:
  mode: http
  timeout: {{connect: 2s, client: 30s, server: 30s}}
frontends:
  - name: web
    bind: ["127.0.0.1:{port}"]
    default_backend: app
backends:
  - name: app
    servers:
{server_lines}
"""


def tcp_config(port: int, echo: str, *, max_reloads: int = 50, hard_stop_after: str = "30s") -> str:
    return f"""\
global:
  max_reloads: {max_reloads}
  hard_stop_after: {hard_stop_after}
frontends:
  - name: echo
    mode: tcp
    bind: ["127.0.0.1:{port}"]
    default_backend: echo
backends:
  - name: echo
    mode: tcp
    servers:
      - {{name: e1, address: "{echo}"}}
"""
