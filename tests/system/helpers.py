"""What the system tests drive: a command runner, the booted container, the
master CLI's ``show proc`` and a load client. The fixtures are in conftest.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
UPGRADE_VERSION = "0.1.0+systemtest1"


def run(cmd: list[str], timeout: float = 120, check: bool = True,
        **kwargs) -> subprocess.CompletedProcess:
    env = kwargs.pop("env", None) or {"PATH": SYSTEM_PATH, "LANG": "C.UTF-8", "HOME": "/root"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
    return proc


@dataclass
class DebPackages:
    suite: str
    current: Path
    upgrade: Path
    chroot: Path  # the suite's build chroot they were built in (lintian is there)

    def buildinfo(self) -> str:
        return next(self.current.parent.glob("*.buildinfo")).read_text()


@dataclass
class Container:
    rootfs: Path
    nspawn: subprocess.Popen
    leader: int  # PID (host view) of the container's systemd
    log: Path
    cgroups: list[Path] = field(default_factory=list)
    suite: str = "bookworm"

    def sh(self, script: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """Run a shell script inside the container, as root, in all its namespaces."""
        return self.run(["sh", "-c", script], timeout=timeout, check=check)

    def run(self, cmd: list[str], timeout: float = 60, check: bool = True,
            **kwargs) -> subprocess.CompletedProcess:
        env = ["env", "-i", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8", "HOME=/root",
               "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0", "DEBIAN_FRONTEND=noninteractive"]
        return run(["nsenter", "-t", str(self.leader), "-a", *env, *cmd],
                   timeout=timeout, check=check, **kwargs)

    def net_cmd(self, cmd: list[str]) -> list[str]:
        """A host command line that runs ``cmd`` in the container's network only."""
        return ["nsenter", "-t", str(self.leader), "-n", *cmd]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run(["systemctl", "show", unit, *(f"--property={p}" for p in props)]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# --- talking to hapymaster inside --------------------------------------------


@dataclass
class Proc:
    pid: int
    type: str
    section: str  # master | workers | old workers
    reloads: str
    version: str


def parse_show_proc(text: str) -> list[Proc]:
    """``show proc``: rows of ``PID type reloads uptime version`` under ``# ...`` headers."""
    procs, section = [], "master"
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") and not stripped.startswith("#<"):
            section = stripped.lstrip("#").strip()
            continue
        fields = stripped.split()
        if not fields or not fields[0].isdigit():
            continue
        reloads = " ".join(fields[2:-2])  # "5 [failed: 0]" on the master line
        procs.append(Proc(int(fields[0]), fields[1], section, reloads, fields[-1]))
    return procs


LOAD_CLIENT = r"""
import json, socket, sys, time, threading
stop_file, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
marker = sys.argv[3].encode()
counts = {"ok": 0, "refused": 0, "reset": 0, "timeout": 0, "bad": 0}
errors = []
lock = threading.Lock()
def one():
    try:
        with socket.create_connection(("127.0.0.1", 80), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        ok = data[:12] in (b"HTTP/1.1 200", b"HTTP/1.0 200") and marker in data
        return "ok" if ok else "bad", data[:80]
    except ConnectionRefusedError as e:
        return "refused", repr(e)
    except (ConnectionResetError, BrokenPipeError) as e:
        return "reset", repr(e)
    except socket.timeout as e:
        return "timeout", repr(e)
def loop():
    import os
    while time.monotonic() < deadline and not os.path.exists(stop_file):
        kind, detail = one()
        with lock:
            counts[kind] += 1
            if kind != "ok" and len(errors) < 5:
                errors.append(f"{kind}: {detail!r}")
threads = [threading.Thread(target=loop) for _ in range(4)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps({"counts": counts, "errors": errors}))
"""


class Load:
    """Connections in a loop from the container's network namespace while
    something else happens: counts every refused or failed one."""

    def __init__(self, c: Container, tmp: Path, marker: str, max_seconds: float = 60):
        self.stop_file = tmp / f"stop-load-{time.monotonic_ns()}"
        self.proc = subprocess.Popen(
            c.net_cmd([sys.executable, "-c", LOAD_CLIENT, str(self.stop_file), str(max_seconds),
                       marker]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(self) -> dict:
        self.stop_file.touch()
        try:
            out, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        assert self.proc.returncode == 0, err
        return json.loads(out)
