"""What every bench scenario shares: processes we start, the CPU cap, reading
/proc, wrk's output, the master CLI, the machine. Only the standard library."""

from __future__ import annotations

import datetime as dt
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hapymaster import mclient  # the master CLI client (HAProxy's master CLI speaks the same)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
VENV = REPO / ".venv" / "bin"
VENV_PY = VENV / "python"

NGINX_PORT = 19001
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ---------------------------------------------------------------- processes

_started: list[subprocess.Popen] = []


def start(cmd: list[str], log: Path, cpu: str | None, env: dict | None = None,
          cap: "CpuCap | None" = None, cap_name: str = "") -> subprocess.Popen:
    """Start a process of ours: pinned to ``cpu``, in the CPU-capped cgroup ``cap_name`` if any.

    The cgroup is joined by a shell that then execs the command, so that the
    process is capped before its first instruction and every child it forks
    (hapymaster's workers, HAProxy's) is born inside the cap.
    """
    if cap is not None:
        cmd = cap.wrap(cap_name, cmd)
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    out = open(log, "ab")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    proc.log_text = lambda: log_tail(log)  # type: ignore[attr-defined]
    _started.append(proc)
    return proc


def log_tail(log: Path, size: int = 3000) -> str:
    """The end of a log that may be large (an access log on stderr grows by megabytes)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def stop_all() -> None:
    # Only what we started, by PID (nginx/haproxy/hapymaster master/sink; both
    # masters stop their own workers on SIGTERM).
    for proc in reversed(_started):
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for proc in reversed(_started):
        try:
            proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _started.clear()


def stop(proc: subprocess.Popen) -> None:
    """Stop one process of ours (and, through its master, its workers)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _started:
        _started.remove(proc)


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with status {proc.returncode} before listening on {port}"
                             f"\n{getattr(proc, 'log_text', lambda: '')()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} is not listening on 127.0.0.1:{port} after {timeout}s")


def wait_serving(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    """Wait until a GET /small through the proxy is answered 200.

    hapymaster's master listens before its worker is READY (it owns the
    sockets), so a port that accepts is not yet a proxy that serves; measuring
    "idle RSS" then would catch a worker still importing.
    """
    wait_port(port, proc, what, timeout)
    deadline = time.time() + timeout
    answer = b""
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2.0) as s:
                s.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                answer = s.recv(64)
                if answer.split(b" ", 2)[1:2] == [b"200"]:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise SystemExit(f"{what} does not answer GET /small on 127.0.0.1:{port} with 200 after "
                     f"{timeout}s (last answer: {answer!r})\n{getattr(proc, 'log_text', lambda: '')()}")


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


# ---------------------------------------------------------------- CPU cap

class CpuCap:
    """One cgroup per proxy, each limited to the same share of a core.

    The layout for when the load core saturates first: with the proxies capped
    (e.g. 40 % of a core each), the proxy is the limit again and the ratio
    compares what each does with the same CPU. cgroup v2 ``cpu.max`` when the
    v2 hierarchy has the cpu controller, else the v1 ``cpu`` controller's
    ``cpu.cfs_quota_us`` (this machine: hybrid layout, v2 has no controllers).
    No systemd-run: it needs systemd as PID 1.
    """

    PERIOD_US = 100_000

    def __init__(self, percent: float):
        self.percent = percent
        self.root, self.kind = self.find_root()
        self.made: list[Path] = []

    @staticmethod
    def find_root() -> tuple[Path, str]:
        for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
            try:
                if "cpu" in (root / "cgroup.controllers").read_text().split():
                    return root, "v2"
            except OSError:
                pass
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            return v1, "v1"
        raise SystemExit("--cap: no cgroup cpu controller (neither v2 cpu.max nor v1 cpu.cfs_quota_us)")

    def describe(self) -> str:
        knob = "cpu.max" if self.kind == "v2" else "cpu.cfs_quota_us"
        return f"capped at {self.percent:g}% of a core per proxy (cgroup {self.kind} {knob})"

    def make(self, name: str) -> Path:
        path = self.root / f"hapybench.{os.getpid()}.{name}"
        path.mkdir()
        self.made.append(path)
        if self.kind == "v2":
            control = self.root / "cgroup.subtree_control"
            if "cpu" not in control.read_text().split():
                control.write_text("+cpu\n")
            (path / "cpu.max").write_text(f"{int(self.PERIOD_US * self.percent / 100)} "
                                          f"{self.PERIOD_US}\n")
        else:
            (path / "cpu.cfs_period_us").write_text(f"{self.PERIOD_US}\n")
            (path / "cpu.cfs_quota_us").write_text(f"{int(self.PERIOD_US * self.percent / 100)}\n")
        return path

    def wrap(self, name: str, cmd: list[str]) -> list[str]:
        path = self.root / f"hapybench.{os.getpid()}.{name}"
        if path not in self.made:
            self.make(name)
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(path), *cmd]

    def throttled(self, name: str) -> float:
        """Seconds the cgroup's processes were held back by the cap so far."""
        path = self.root / f"hapybench.{os.getpid()}.{name}"
        try:
            for line in (path / "cpu.stat").read_text().splitlines():
                key, value = line.split()
                if key == "throttled_usec":
                    return int(value) / 1e6
                if key == "throttled_time":
                    return int(value) / 1e9
        except (OSError, ValueError):
            pass
        return 0.0

    def remove(self) -> None:
        for path in self.made:
            try:
                path.rmdir()
            except OSError:
                pass
        self.made.clear()


# ---------------------------------------------------------------- /proc

def proc_cpu(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / CLK_TCK


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its reaped children and its live descendants."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    total = sum(int(x) for x in f[11:15]) / CLK_TCK
    return total + sum(tree_cpu(child) for child in children(pid))


def proc_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def smaps_private_kib(pid: int) -> int:
    """Private_Clean + Private_Dirty of a process (/proc/PID/smaps_rollup), in KiB.

    What the process costs on its own: a forked worker shares the pages of
    the template it came from until it writes to them.
    """
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    except OSError:
        return 0
    return total


def cpu_split() -> tuple[float, float]:
    """All cores together, in seconds: (user+nice+system, irq+softirq) from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (v[0] + v[1] + v[2]) / CLK_TCK, (v[5] + v[6]) / CLK_TCK


OURS: list[int] = []               # pids whose CPU (and their children's) is ours


def ours_cpu(pids: list[int] | None = None) -> float:
    """CPU seconds of our long-running process trees, this script and its reaped children (wrk)."""
    total = sum(tree_cpu(pid) for pid in (OURS if pids is None else pids))
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return total + me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def core_busy() -> dict[int, tuple[int, int]]:
    """Per core: (busy jiffies, total jiffies) from /proc/stat."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            v = [int(x) for x in m.group(2).split()]
            idle = v[3] + v[4]
            out[int(m.group(1))] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


class Foreign:
    """CPU (in cores) used by processes that are not ours, over a window."""

    def __init__(self) -> None:
        self.all0, self.ours0, self.t0 = cpu_split()[0], ours_cpu(), time.monotonic()

    def cores(self) -> float:
        wall = max(1e-6, time.monotonic() - self.t0)
        return max(0.0, (cpu_split()[0] - self.all0) - (ours_cpu() - self.ours0)) / wall


def foreign_now(window: float) -> float:
    f = Foreign()
    time.sleep(window)
    return f.cores()


def wait_quiet(limit: float, patience: float) -> None:
    """Wait (at most ``patience`` s) for a half-second in which others use < ``limit`` core."""
    deadline = time.monotonic() + patience
    while time.monotonic() < deadline and foreign_now(0.5) > limit:
        pass


class Sampler(threading.Thread):
    """Peak RSS of the proxy process while a run goes on."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                self.peak = max(self.peak, proc_rss_kib(self.pid))
            except OSError:
                return
            self.halt.wait(0.2)


# ---------------------------------------------------------------- wrk

_UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}


@dataclass
class WrkResult:
    rps: float
    bps: float                     # Transfer/sec, bytes
    requests: int
    non2xx: int
    connect: int = 0
    read: int = 0
    write: int = 0
    timeout: int = 0

    @property
    def errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout + self.non2xx

    def socket_errors(self) -> str:
        return f"connect {self.connect}, read {self.read}, write {self.write}, timeout {self.timeout}"


def parse_wrk(text: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    m = re.search(r"Transfer/sec:\s+([\d.]+)(\w+)", text)
    bps = float(m.group(1)) * _UNITS[m.group(2)] if m else 0.0
    m = re.search(r"(\d+) requests in", text)
    requests = int(m.group(1)) if m else 0
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    out = WrkResult(rps, bps, requests, int(m.group(1)) if m else 0)
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        out.connect, out.read, out.write, out.timeout = (int(x) for x in m.groups())
    return out


def wrk_cmd(port: int, path: str, conns: int, duration: float, cpu: str,
            headers: tuple[str, ...] = (), script: str | None = None) -> list[str]:
    cmd = ["taskset", "-c", cpu, "wrk", "-t", "1", "-c", str(conns), "-d", f"{duration:g}s",
           "--latency", "--timeout", "10s"]
    for h in headers:
        cmd += ["-H", h]
    if script:
        cmd += ["-s", str(BENCH / script)]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    return cmd


# ---------------------------------------------------------------- master CLI

def master_cli(path: str | Path, command: str, timeout: float = 10.0) -> str:
    """One command on a master CLI (hapymaster's or HAProxy's: same protocol)."""
    return mclient.client(str(path), command, timeout)


@dataclass
class ProcList:
    reloads: int
    failed: int
    workers: list[int]
    old: list[int]


def parse_show_proc(text: str) -> ProcList:
    """``show proc`` of either master: the master line, then ``# workers`` / ``# old workers``."""
    reloads = failed = 0
    workers: list[int] = []
    old: list[int] = []
    section = None
    for line in text.splitlines():
        if line.startswith("# "):
            section = line[2:].strip()
            continue
        parts = line.split()
        if len(parts) < 3 or not parts[0].isdigit():
            continue
        if parts[1] == "master":
            reloads = int(parts[2])
            m = re.search(r"\[failed: (\d+)\]", line)
            failed = int(m.group(1)) if m else 0
        elif parts[1] == "worker":
            (workers if section == "workers" else old).append(int(parts[0]))
    return ProcList(reloads, failed, workers, old)


def show_proc(path: str | Path, patience: float = 10.0) -> ProcList:
    """``show proc``, retried while the master cannot answer (HAProxy's re-exec)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            return parse_show_proc(master_cli(path, "show proc", timeout=2.0))
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


# ---------------------------------------------------------------- machine

def machine_info(hapy_src: str) -> dict[str, str]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    py = sh(str(VENV_PY), "-c",
            "import sys, uvloop, httptools; print(sys.version.split()[0], uvloop.__version__, "
            "httptools.__version__)").split()
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": sh("nproc"),
        "cpu": cpu,
        "kernel": sh("uname", "-r"),
        "os": sh("sh", "-c", ". /etc/os-release; echo $PRETTY_NAME"),
        "python": py[0] if py else "?",
        "uvloop": py[1] if len(py) > 1 else "?",
        "httptools": py[2] if len(py) > 2 else "?",
        "haproxy": sh("haproxy", "-v").splitlines()[0] if sh("haproxy", "-v") else "?",
        "nginx": sh("sh", "-c", "nginx -v 2>&1"),
        "wrk": sh("sh", "-c", "wrk -v 2>&1 | head -1"),
        "hapymaster": hapy_src,
    }


def machine_table(info: dict[str, str]) -> list[str]:
    out = ["| | |", "|---|---|"]
    for k in ("nproc", "cpu", "kernel", "os", "python", "uvloop", "httptools", "haproxy", "nginx",
              "wrk", "hapymaster"):
        out.append(f"| {k} | {info[k]} |")
    return out
