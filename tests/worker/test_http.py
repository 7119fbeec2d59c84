"""HTTP/1.1 proxying: bodies, chunked, 100-continue, pipelining, Upgrade,
routes, HTTP/1.0, HEAD."""

from __future__ import annotations

import hashlib
import re
import http.client
import json
import socket
import time

from worker_harness import http_config, http_get, origin_of, pattern_bytes, raw_exchange


def connect(front: str, timeout: float = 5.0) -> socket.socket:
    host, port = front.rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=timeout)


def read_response(sock_file) -> tuple[int, dict[str, str], bytes]:
    """Read one response from a socket file (Content-Length or chunked)."""
    status_line = sock_file.readline()
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = sock_file.readline()
        if line in (b"\r\n", b""):
            break
        name, value = line.decode().split(":", 1)
        headers[name.strip().lower()] = value.strip()
    body = b""
    if "content-length" in headers:
        body = sock_file.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        while True:
            size = int(sock_file.readline(), 16)
            if size == 0:
                sock_file.readline()
                break
            body += sock_file.read(size)
            sock_file.readline()
    return status, headers, body


def get_on(sock: socket.socket, sock_file, path: bytes) -> None:
    """The connection still serves: a GET on it is answered by the origin."""
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)
    status, _, body = read_response(sock_file)
    assert status == 200 and json.loads(body)["path"] == path.decode()


def test_10mb_bodies_both_ways_intact(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    payload = pattern_bytes(10 * 1024 * 1024)
    status, _, body = http_get(front, "/upload", method="POST", body=payload, timeout=30)
    info = json.loads(body)
    assert status == 200 and info["received"] == len(payload)
    assert info["sha256"] == hashlib.sha256(payload).hexdigest()
    for path in ("/big/10485760", "/big/10485760/chunked"):
        status, headers, body = http_get(front, path, timeout=30)
        assert status == 200 and len(body) == 10 * 1024 * 1024
        assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()


def test_chunked_request_streamed(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    pieces = [b"hello ", b"chunked ", b"world" * 1000]

    def gen():
        yield from pieces

    # http.client sends an iterator body chunked when no length is given.
    status, _, body = http_get(front, "/c", method="POST", body=gen())
    info = json.loads(body)
    assert status == 200 and info["received"] == sum(map(len, pieces))
    assert info["sha256"] == hashlib.sha256(b"".join(pieces)).hexdigest()
    assert info["headers"].get("Transfer-Encoding") == "chunked"


def test_expect_100_continue(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    with connect(front) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        assert f.readline().startswith(b"HTTP/1.1 100")
        assert f.readline() == b"\r\n"
        sock.sendall(b"hello")
        status, _, body = read_response(f)
        assert status == 200 and json.loads(body)["received"] == 5


def test_pipelined_requests_answered_in_order(backend, bind, run_worker):
    a, b = backend("a"), backend("b")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address), ("b", b.address)]))
    with connect(front) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(5)))
        paths = []
        for _ in range(5):
            status, _, body = read_response(f)
            assert status == 200
            paths.append(json.loads(body)["path"])
    assert paths == [f"/p{i}" for i in range(5)]


def test_http10_client_and_head(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    answer = raw_exchange(front, b"GET /old HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
    with connect(front) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, _ = read_response(f)
        assert status == 200 and headers["connection"] == "keep-alive"
        sock.sendall(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
        status_line = f.readline()
        assert status_line.startswith(b"HTTP/1.1 200")
        headers = {}
        while (line := f.readline()) != b"\r\n":
            name, value = line.decode().split(":", 1)
            headers[name.lower()] = value.strip()
        assert int(headers["content-length"]) > 0
        # No body after a HEAD answer: the next request works on the same connection.
        get_on(sock, f, b"/after")


def test_connection_close_respected(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    answer = raw_exchange(front, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                                 b"GET /never HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.count(b"HTTP/1.1 ") == 1 and b"connection: close" in answer.lower()


def test_routes_by_path_and_host(backend, bind, run_worker):
    app, api, static = backend("app"), backend("api"), backend("static")
    front = bind("web")
    config = f"""\
frontends:
  - name: web
    bind: ["{front}"]
    default_backend: app
    routes:
      - {{path_prefix: /api, backend: api}}
      - {{host: static.example.com, backend: static}}
backends:
  - name: app
    servers: [{{name: s, address: "{app.address}"}}]
  - name: api
    servers: [{{name: s, address: "{api.address}"}}]
  - name: static
    servers: [{{name: s, address: "{static.address}"}}]
"""
    run_worker(config)
    assert origin_of(http_get(front, "/api/v1")[2]) == "api"
    assert origin_of(http_get(front, "/x", headers={"Host": "static.example.com:80"})[2]) == "static"
    assert origin_of(http_get(front, "/x", headers={"Host": "STATIC.example.com"})[2]) == "static"
    assert origin_of(http_get(front, "/x", headers={"Host": "other"})[2]) == "app"


def test_websocket_upgrade_tunnel(bind, run_worker):
    # A tiny origin that accepts the upgrade and then echoes raw bytes.
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        f = conn.makefile("rb")
        while f.readline() not in (b"\r\n", b""):
            pass
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\n\r\nwelcome")
        while True:
            data = conn.recv(1000)
            if not data:
                break
            conn.sendall(data.upper())
        conn.close()

    threading.Thread(target=serve, daemon=True).start()
    front = bind("web")
    run_worker(http_config(front, [("ws", f"127.0.0.1:{port}")]))
    with connect(front) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        f = sock.makefile("rb")
        assert f.readline().startswith(b"HTTP/1.1 101")
        headers = b""
        while (line := f.readline()) != b"\r\n":
            headers += line
        assert b"upgrade: websocket" in headers.lower()
        assert f.read(7) == b"welcome"
        sock.sendall(b"ping over the tunnel")
        assert f.read(20) == b"PING OVER THE TUNNEL"
    listener.close()


def test_answer_before_the_body_ends_keeps_the_client_connection(backend, bind, run_worker):
    # A server may answer before the request body is all there (nginx's
    # "return 200" does); the client still sending must not be cut off, and
    # its connection must serve its next request.
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    size = 4 * 1024 * 1024
    piece = pattern_bytes(65536)
    with connect(front, timeout=10) as sock:
        f = sock.makefile("rb")
        # Answered after part of the body, then before a single byte of it.
        for sent_first, after in ((1, b"/after"), (0, b"/last")):
            sock.sendall(b"POST /early HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            for _ in range(sent_first):
                sock.sendall(piece)
            status, _, body = read_response(f)
            assert status == 200 and body == b"early a\n"
            for _ in range(size // len(piece) - sent_first):
                sock.sendall(piece)
            get_on(sock, f, after)


def test_large_bodies_back_to_back_on_one_connection(backend, bind, run_worker):
    # Large bodies pass without the parser; the exchange that follows on the
    # same client and server connections must start exactly where they end.
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    upload = pattern_bytes(300_000)
    with connect(front, timeout=10) as sock:
        f = sock.makefile("rb")
        for _ in range(3):
            sock.sendall(b"GET /big/1000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _, body = read_response(f)
            assert status == 200 and body == pattern_bytes(1_000_000)
        # The end of the body and the next request in the same read.
        sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(upload)
                     + upload + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = read_response(f)
        info = json.loads(body)
        assert status == 200 and info["received"] == len(upload)
        assert info["sha256"] == hashlib.sha256(upload).hexdigest()
        status, _, body = read_response(f)   # the pipelined GET, already sent
        assert status == 200 and json.loads(body)["path"] == "/next"
    assert len(a.connections) == 1


def test_client_leaving_mid_download_frees_everything(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    for _ in range(3):
        with connect(front) as sock:
            sock.sendall(b"GET /big/20000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.recv(65536)
        # Closed with most of the body still on its way.
    status, _, body = http_get(front, "/big/1000000")
    assert status == 200 and body == pattern_bytes(1_000_000)
    assert worker.proc.poll() is None
    assert "Traceback" not in worker.log and "Fatal error" not in worker.log


def test_garbage_pipelined_during_a_streaming_answer_waits_for_its_end(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    size = 4_000_000
    with connect(front, timeout=10) as sock:
        sock_file = sock.makefile("rb")
        sock.sendall(b"GET /big/%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
        assert sock_file.readline().startswith(b"HTTP/1.1 200")
        # The answer is streaming (the client reads nothing more for now)
        # when an invalid request follows.
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        time.sleep(0.3)
        headers = {}
        while True:
            line = sock_file.readline()
            if line == b"\r\n":
                break
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        assert int(headers["content-length"]) == size
        assert sock_file.read(size) == pattern_bytes(size)     # intact, no page inside
        status, headers, body = read_response(sock_file)
        assert status == 400 and headers["connection"] == "close"
        assert sock_file.read() == b""
    assert "Traceback" not in worker.log


def test_pipelined_garbage_after_a_valid_request_answers_both(backend, bind, run_worker):
    a = backend("a")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    answer = raw_exchange(front, b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
                                 b"GET /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"Content-Length: 3\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and b'"/first"' in answer
    assert answer.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400" in answer
    assert [path for _, path, _ in a.requests] == ["/first"]


def test_client_leaving_mid_download_is_logged_and_counted_as_client_abort(backend, bind,
                                                                          run_worker):
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    with connect(front) as sock:
        sock.sendall(b"GET /big/20000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        sock.recv(65536)
    deadline = time.monotonic() + 5
    line = re.compile(r' web app/a \S+ 200 \d+ - - CD-- .*"GET /big/20000000 HTTP/1\.1"')
    while not line.search(worker.log):
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.05)
    stat = worker.cli("show stat").splitlines()
    header = stat[0][2:].split(",")
    rows = {(r[0], r[1]): dict(zip(header, r)) for r in (l.split(",") for l in stat[1:] if l)}
    assert rows[("app", "a")]["cli_abrt"] == "1" and rows[("app", "BACKEND")]["cli_abrt"] == "1"
    assert rows[("app", "a")]["srv_abrt"] == "0" and rows[("app", "BACKEND")]["srv_abrt"] == "0"
