"""The first thing a new user runs: hapymaster with no config at all."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from hapymaster.config import DEFAULT_CONFIG_PATH
from master_harness import ROOT, http_get, pid_alive, wait_for

DEMO_PORTS = (8080, 8404, 8081, 8082)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(os.path.exists(DEFAULT_CONFIG_PATH),
                    reason=f"{DEFAULT_CONFIG_PATH} exists: the embedded demo would not run")
def test_embedded_demo_serves_round_robin(notify_socket, tmp_path):
    busy = [p for p in DEMO_PORTS if not port_free(p)]
    if busy:
        pytest.skip(f"demo ports in use on this machine: {busy}")
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    env["NOTIFY_SOCKET"] = notify_socket.path
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "hapymaster"], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env=env, cwd=ROOT)
    try:
        notify_socket.wait("READY", "1", timeout=20)
        answers = [http_get(8080, f"/{n}")[1] for n in range(4)]
        origins = [re.search(r"origin-\d", a).group(0) for a in answers]  # type: ignore[union-attr]
        assert origins == ["origin-1", "origin-2", "origin-1", "origin-2"], answers
        status, page = http_get(8404, "/")
        assert status == 200 and "demo-origins" in page
        text = log_path.read_text()
        assert "embedded demo config" in text
        socket_path = re.search(r"hapymaster ctl -S (\S+) show proc", text).group(1)  # type: ignore[union-attr]
        out = subprocess.run([sys.executable, "-m", "hapymaster", "ctl", "-S", socket_path,
                              "show", "proc"], capture_output=True, text=True, timeout=10, cwd=ROOT)
        assert "# workers" in out.stdout
        workers = [int(line.split()[0]) for line in out.stdout.splitlines()[3:]
                   if line.split() and line.split()[0].isdigit()]
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(20)
    assert code == 0
    # Everything it started is gone: workers, the demo origins, the scratch directory.
    wait_for(lambda: not any(pid_alive(p) for p in workers), what="workers gone")
    wait_for(lambda: all(port_free(p) for p in DEMO_PORTS), what="demo ports released")
    assert not os.path.exists(os.path.dirname(socket_path))
