"""Fixtures for worker tests: real backends and a real worker process.

``backend(name, ...)`` starts an HTTP/1.1 origin on 127.0.0.1 (a thread in
the test process) that puts its name in every answer; ``tcp_backend(name)``
an echo server that greets with its name. ``run_worker(config_text)`` starts
``python -m hapymaster.worker`` exactly as the master does (socketpair,
inherited pre-bound listeners, boot message) and plays the master's side:
it waits for ``_send_status READY``, sends CLI commands and answers
``gather`` with the worker's own output.
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import queue
import resource
import socket
import socketserver
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- HTTP origin -------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "origin"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        origin: Origin = self.server.origin  # type: ignore[attr-defined]
        origin.requests.append((self.command, self.path, dict(self.headers.items())))
        origin.connections.add(self.client_address)
        path = self.path
        if origin.delay:
            time.sleep(origin.delay)
        if path.startswith("/delay/"):
            time.sleep(float(path.split("/")[2]))
        if path == "/health":
            status = origin.health_status
            body = f"health {origin.name}\n".encode()
            self._send(status, body)
            return
        if origin.fail:
            self._send(500, f"failing {origin.name}\n".encode())
            return
        if path.startswith("/status/"):
            self._send(int(path.split("/")[2]), f"{origin.name}\n".encode())
            return
        if path == "/early":
            # Answers before reading the body, then reads and drops it, as
            # nginx's `return 200` does.
            self._send(200, f"early {origin.name}\n".encode())
        body_hash = hashlib.sha256()
        received = 0
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                data = self.rfile.read(size)
                body_hash.update(data)
                received += len(data)
                self.rfile.readline()
        elif length:
            left = int(length)
            while left:
                data = self.rfile.read(min(left, 1 << 20))
                if not data:
                    break
                body_hash.update(data)
                received += len(data)
                left -= len(data)
        if path == "/early":
            return
        if path.startswith("/big/"):
            size = int(path.split("/")[2])
            self.send_response(200)
            self.send_header("X-Origin", origin.name)
            if "chunked" in path:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.send_header("Content-Length", str(size))
            self.end_headers()
            block = _pattern_block()
            left = size
            while left:
                piece = block[:min(left, len(block))]
                if "chunked" in path:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
                left -= len(piece)
            if "chunked" in path:
                self.wfile.write(b"0\r\n\r\n")
            return
        info = {"origin": origin.name, "method": self.command, "path": path,
                "received": received, "sha256": body_hash.hexdigest(),
                "headers": dict(self.headers.items())}
        self._send(200, (json.dumps(info) + "\n").encode())

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("X-Origin", self.server.origin.name)  # type: ignore[attr-defined]
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer


def _pattern_block() -> bytes:
    return bytes(range(256)) * 256  # 64 kB


def pattern_bytes(size: int) -> bytes:
    block = _pattern_block()
    return (block * (size // len(block) + 1))[:size]


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client (the proxy) hanging up mid-request is part of the tests


class Origin:
    """A running HTTP origin server; change ``delay``/``fail``/``health_status`` live."""

    def __init__(self, name: str, delay: float = 0.0, port: int = 0):
        self.name = name
        self.delay = delay
        self.fail = False
        self.health_status = 200
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.connections: set[tuple[str, int]] = set()
        self.httpd = _QuietHTTPServer(("127.0.0.1", port), _Handler)
        self.httpd.daemon_threads = True
        self.httpd.origin = self  # type: ignore[attr-defined]
        self.port = self.httpd.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _EchoHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        origin = self.server.origin  # type: ignore[attr-defined]
        self.request.sendall(f"hello from {origin.name}\n".encode())
        while True:
            data = self.request.recv(1 << 20)
            if not data:
                break
            self.request.sendall(data)
        self.request.shutdown(socket.SHUT_WR)


class _ThreadingTCP(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class EchoOrigin:
    def __init__(self, name: str):
        self.name = name
        self.server = _ThreadingTCP(("127.0.0.1", 0), _EchoHandler)
        self.server.origin = self  # type: ignore[attr-defined]
        self.port = self.server.server_address[1]
        self.address = f"127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def backend() -> Callable[..., Origin]:
    started: list[Origin] = []

    def start(name: str, delay: float = 0.0) -> Origin:
        origin = Origin(name, delay)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()


@pytest.fixture
def tcp_backend() -> Callable[[str], EchoOrigin]:
    started: list[EchoOrigin] = []

    def start(name: str) -> EchoOrigin:
        origin = EchoOrigin(name)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.stop()


# --- the worker process --------------------------------------------------------


class WorkerProcess:
    """A worker started the way the master starts one, with the master's side played here."""

    def __init__(self, config_text: str, binds: dict[str, socket.socket], state: Any = None,
                 generation: int = 1, env: dict[str, str] | None = None,
                 nofile: int | None = None):
        self.config_text = config_text
        self.binds = binds
        self.parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [child.fileno()] + [s.fileno() for s in binds.values()]
        environment = dict(os.environ, HAPYMASTER_CONTROL_FD=str(child.fileno()))
        environment.update(env or {})
        def limit_fds() -> None:  # ``ulimit -n``, as a unit's LimitNOFILE= sets it
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE,
                                   (nofile, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
        self.proc = subprocess.Popen([sys.executable, "-m", "hapymaster.worker"], pass_fds=fds,
                                     env=environment, stdin=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, cwd=ROOT, preexec_fn=limit_fds)
        child.close()
        self.stderr_lines: list[str] = []
        self._stderr_thread = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_thread.start()
        self.lines: queue.Queue[str] = queue.Queue()
        self.replies: dict[int, queue.Queue[str]] = {}
        self.ids = itertools.count(1000)
        self.ready = threading.Event()
        self.gathers = 0
        self.extra_gather_outputs: list[str] = []
        boot = {"type": "boot", "generation": generation, "index": 1, "master_pid": os.getpid(),
                "config_path": "test.yaml", "config_text": config_text,
                "listeners": [{"address": address, "fd": sock.fileno()}
                              for address, sock in binds.items()],
                "state": state}
        self.parent.sendall(json.dumps(boot).encode() + b"\n")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.stderr_lines)

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                data = self.parent.recv(65536)
            except OSError:
                return
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                line = raw.decode()
                if line == "_send_status READY":
                    self.ready.set()
                    continue
                if not line.startswith("{"):
                    self.lines.put(line)
                    continue
                message = json.loads(line)
                if message["type"] == "cli_reply":
                    self.replies.setdefault(message["id"], queue.Queue()).put(message["output"])
                elif message["type"] == "gather":
                    threading.Thread(target=self._gather, args=(message,), daemon=True).start()

    def _gather(self, message: dict[str, Any]) -> None:
        self.gathers += 1
        output = self.cli(message["command"])
        outputs = [output] + list(self.extra_gather_outputs)
        self.send({"type": "gathered", "id": message["id"], "outputs": outputs})

    def send(self, message: dict[str, Any]) -> None:
        self.parent.sendall(json.dumps(message).encode() + b"\n")

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker not READY after {timeout}s:\n{self.log}")

    def cli(self, command: str, timeout: float = 5.0) -> str:
        ident = next(self.ids)
        box = self.replies.setdefault(ident, queue.Queue())
        self.send({"type": "cli", "id": ident, "command": command})
        try:
            return box.get(timeout=timeout)
        finally:
            self.replies.pop(ident, None)

    def address(self, bind: str) -> tuple[str, int]:
        host, port = bind.rsplit(":", 1)
        return host, int(port)

    def wait_exit(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        try:
            self.parent.close()
        except OSError:
            pass


class Binder:
    """Pre-binds listening sockets on ephemeral ports, like the master does."""

    def __init__(self) -> None:
        self.sockets: dict[str, socket.socket] = {}

    def __call__(self, name: str) -> str:
        if name not in self.sockets:
            self.sockets[name] = free_listener()
        return "127.0.0.1:%d" % self.sockets[name].getsockname()[1]

    def for_worker(self) -> dict[str, socket.socket]:
        return {"127.0.0.1:%d" % s.getsockname()[1]: s for s in self.sockets.values()}

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture
def bind() -> Binder:
    binder = Binder()
    yield binder
    binder.close()


@pytest.fixture
def run_worker(bind: Binder) -> Callable[..., WorkerProcess]:
    started: list[WorkerProcess] = []

    def start(config_text: str, state: Any = None, ready: bool = True,
              generation: int = 1, nofile: int | None = None) -> WorkerProcess:
        worker = WorkerProcess(config_text, bind.for_worker(), state=state, generation=generation,
                               nofile=nofile)
        started.append(worker)
        if ready:
            worker.wait_ready()
        return worker

    yield start
    for worker in started:
        worker.stop()


# --- clients -------------------------------------------------------------------


def http_get(address: str, path: str = "/", method: str = "GET", body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 5.0
             ) -> tuple[int, dict[str, str], bytes]:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), data
    finally:
        conn.close()


def raw_exchange(address: str, data: bytes, timeout: float = 5.0, shut: bool = False) -> bytes:
    """Send raw bytes, read until the proxy closes (or timeout)."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except socket.timeout:
            pass
        return b"".join(chunks)


def origin_of(body: bytes) -> str:
    return json.loads(body)["origin"]


def http_config(frontend_bind: str, servers: list[tuple[str, str]], extra_backend: str = "",
                extra_global: str = "", extra_frontend: str = "", balance: str = "roundrobin",
                extra_defaults: str = "") -> str:
    lines = ["global:", "  workers: 1"]
    if extra_global:
        lines.append(extra_global)
    lines += ["defaults:", "  mode: http"]
    if extra_defaults:
        lines.append(extra_defaults)
    lines += ["frontends:", "  - name: web", f"    bind: [\"{frontend_bind}\"]",
              "    default_backend: app"]
    if extra_frontend:
        lines.append(extra_frontend)
    lines += ["backends:", "  - name: app", f"    balance: {balance}"]
    if extra_backend:
        lines.append(extra_backend)
    lines.append("    servers:")
    for name, address in servers:
        lines.append(f"      - {{name: {name}, address: \"{address}\"}}")
    return "\n".join(lines) + "\n"


class RawServer:
    """A raw TCP server on 127.0.0.1: each connection is handed to ``answer``
    in a thread of its own; ``connections`` counts them (to see reuse)."""

    def __init__(self) -> None:
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()

