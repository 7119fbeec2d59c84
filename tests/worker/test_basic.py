"""The worker as the master sees it: READY, round robin over HTTP and TCP,
keep-alive, show info, soft stop and stop."""

from __future__ import annotations

import http.client
import json
import os
import pwd
import signal
import socket
import time

import pytest

from worker_harness import http_config, http_get, origin_of, raw_exchange


def test_ready_then_round_robin(backend, bind, run_worker):
    a, b = backend("alpha"), backend("beta")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address), ("b", b.address)]))
    seen = [origin_of(http_get(front, "/x")[2]) for _ in range(6)]
    assert seen == ["alpha", "beta"] * 3


def test_keep_alive_both_sides_reuses_server_connection(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    host, port = front.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    for i in range(5):
        conn.request("GET", f"/n{i}")
        response = conn.getresponse()
        assert response.status == 200
        assert origin_of(response.read()) == "alpha"
    conn.close()
    assert len(a.requests) == 5
    # One client connection, one server connection: the pool reused it.
    assert len(a.connections) == 1


def test_forwarded_headers(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    status, headers, body = http_get(front, "/h", headers={"Connection": "close, X-Secret",
                                                          "X-Secret": "no", "Keep-Alive": "1"})
    seen = json.loads(body)["headers"]
    assert seen["X-Forwarded-For"] == "127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["Forwarded"].startswith("for=127.0.0.1;proto=http")
    assert "X-Secret" not in seen and "Keep-Alive" not in seen
    assert headers.get("Connection") == "close"


def test_tcp_relay_round_robin(tcp_backend, bind, run_worker):
    a, b = tcp_backend("alpha"), tcp_backend("beta")
    front = bind("tcp")
    config = http_config(front, [("a", a.address), ("b", b.address)]).replace("mode: http",
                                                                                "mode: tcp")
    run_worker(config)
    greetings = []
    for _ in range(4):
        with socket.create_connection(("127.0.0.1", int(front.rsplit(":", 1)[1])),
                                      timeout=5) as sock:
            f = sock.makefile("rb")
            greetings.append(f.readline().decode().strip())
            sock.sendall(b"ping\n")
            assert f.readline() == b"ping\n"
            sock.shutdown(socket.SHUT_WR)  # half-close: the answer still comes back
            assert f.read() == b""
    assert greetings == ["hello from alpha", "hello from beta"] * 2


def test_show_info_and_unknown_command(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    info = worker.cli("show info")
    assert info.endswith("\n")
    fields = dict(line.split(": ", 1) for line in info.splitlines())
    assert fields["Name"] == "hapymaster"
    assert int(fields["Pid"]) == worker.proc.pid
    assert fields["Generation"] == "1"
    answer = worker.cli("frobnicate")
    assert answer.count("\n") == 1 and "Unknown command" in answer


def test_soft_stop_finishes_busy_request_closes_idle(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    host, port = front.rsplit(":", 1)
    idle = http.client.HTTPConnection(host, int(port), timeout=5)
    idle.request("GET", "/warm")
    idle.getresponse().read()
    busy = http.client.HTTPConnection(host, int(port), timeout=5)
    busy.request("GET", "/delay/0.6")
    time.sleep(0.2)
    worker.proc.send_signal(signal.SIGUSR1)
    response = busy.getresponse()
    assert response.status == 200 and response.getheader("Connection") == "close"
    assert origin_of(response.read()) == "alpha"
    assert worker.wait_exit(5) == 0
    # New connections are no longer accepted by this worker.


def test_sigterm_exits_zero_and_sigint_ignored(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    worker.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    assert worker.proc.poll() is None
    assert http_get(front, "/")[0] == 200
    worker.proc.send_signal(signal.SIGTERM)
    assert worker.wait_exit(5) == 0


def test_master_gone_worker_exits(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)]))
    worker.parent.shutdown(socket.SHUT_RDWR)  # the reader thread holds it open otherwise
    worker.parent.close()
    assert worker.wait_exit(8) == 0


def test_bad_config_exits_nonzero(bind, run_worker):
    front = bind("web")
    worker = run_worker("frontends: [", ready=False)
    assert worker.wait_exit(10) != 0
    assert "test.yaml:" in worker.log


def test_drops_privileges_when_root(backend, bind, run_worker):
    if os.getuid() != 0:
        pytest.skip("needs root")
    a = backend("alpha")
    front = bind("web")
    config = http_config(front, [("a", a.address)],
                         extra_global="  user: nobody\n  group: nogroup")
    worker = run_worker(config)
    with open(f"/proc/{worker.proc.pid}/status") as handle:
        status = dict(line.split(":", 1) for line in handle)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert status["Uid"].split()[0] == str(nobody)
    assert status["Uid"].split()[1] == str(nobody)
    assert status["Groups"].split() == [status["Gid"].split()[0]]
    assert http_get(front)[0] == 200


def test_client_half_close_still_gets_whole_response(backend, bind, run_worker):
    a = backend("alpha")
    front = bind("web")
    run_worker(http_config(front, [("a", a.address)]))
    answer = raw_exchange(front, b"GET /big/3000000 HTTP/1.1\r\nHost: x\r\n\r\n", shut=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == 3000000
