#!/usr/bin/env python3
"""hapymaster vs HAProxy on this machine: see bench/README.md for the method.

Throughput scenarios: nginx (origin), hapymaster (1 worker) and HAProxy
(nbthread 1), the proxies pinned on one core and wrk + nginx on the other,
every scenario against both proxies in alternation, a table of medians with
the hapymaster/HAProxy ratio. Reload scenarios (reloads.py): 2 workers / 2
threads in master-worker mode, reloads under load. The tables are printed and
written to bench/results/<UTC date>.md with the machine and the command.

Only the standard library; run it through bench/run.
"""

from __future__ import annotations

import argparse
import atexit
import datetime as dt
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import reloads
from common import (BENCH, MIB, NGINX_PORT, OURS, REPO, VENV_PY, CpuCap, Foreign, Sampler,
                    core_busy, log_tail, machine_info, machine_table, parse_wrk,
                    proc_cpu, proc_rss_kib, show_proc, smaps_private_kib, start, stop, stop_all,
                    wait_port, wait_quiet,
                    wait_serving, wrk_cmd)
from configs import (HAP_HTTP, HAP_HTTP_LOG, HAP_HTTP_SPLICE, HAP_PROBE, HAP_TCP, HAP_TCP_SPLICE,
                     HAPY_HTTP, HAPY_HTTP_LOG, HAPY_TCP, VARIANT_STEP, write_haproxy,
                     write_hapymaster, write_origin)


@dataclass
class Scenario:
    name: str
    title: str
    path: str
    conns: int
    unit: str                      # "req/s" or "MB/s"
    tcp: bool = False              # through the TCP-mode frontend
    splice: bool = False           # HAProxy through its 'option splice-auto' frontends
    logged: bool = False           # through the frontend with the access log on (both proxies)
    headers: tuple[str, ...] = ()
    script: str | None = None      # wrk lua script
    body_size: int = 0             # upload body (MB/s = req/s * body_size)
    target: float = 1.0            # hapymaster/HAProxy ratio that issue 9 asks for


SCENARIOS = [
    Scenario("http-keepalive", "HTTP small response, keep-alive clients", "/small", 50, "req/s",
             target=1.0),
    Scenario("http-close", "HTTP small response, `Connection: close` (new connection per request)",
             "/small", 50, "req/s", headers=("Connection: close",), target=1.0),
    Scenario("http-keepalive-log", "http-keepalive with the access log on (both proxies)", "/small",
             50, "req/s", logged=True, target=1.0),
    Scenario("http-close-log", "http-close with the access log on (both proxies)", "/small", 50,
             "req/s", logged=True, headers=("Connection: close",), target=1.0),
    Scenario("http-bulk-1m", "HTTP 1 MiB response download", "/1m", 8, "MB/s"),
    Scenario("http-bulk-1m-splice", "http-bulk-1m, HAProxy with `option splice-auto`", "/1m", 8,
             "MB/s", splice=True),
    Scenario("http-bulk-10m", "HTTP 10 MiB response download", "/10m", 4, "MB/s"),
    Scenario("http-bulk-10m-splice", "http-bulk-10m, HAProxy with `option splice-auto`", "/10m", 4,
             "MB/s", splice=True),
    Scenario("tcp-relay-10m", "TCP mode relay, 10 MiB response (HTTP through `mode: tcp`)", "/10m",
             4, "MB/s", tcp=True, target=1.2),
    Scenario("tcp-relay-10m-splice", "tcp-relay-10m, HAProxy with `option splice-auto`", "/10m", 4,
             "MB/s", tcp=True, splice=True, target=1.2),
    Scenario("tcp-small", "TCP mode relay, small keep-alive GETs (HTTP through `mode: tcp`)",
             "/small", 50, "req/s", tcp=True, target=1.2),
    Scenario("http-upload-1m", "HTTP 1 MiB POST body upload", "/upload", 4, "MB/s",
             script="upload.lua", body_size=MIB),
]


@dataclass
class Run:
    value: float                   # req/s or MB/s
    rps: float
    mbps: float
    cpu: float                     # proxy CPU, fraction of one core
    core: dict[int, float]         # busy fraction per core
    rss_kib: int
    foreign: float = 0.0           # CPU used by processes not ours, in cores
    non2xx: int = 0
    sock_errors: str = ""
    requests: int = 0
    logged: int = -1               # lines the syslog sink received during the run (HAProxy), -1: n/a
    raw: str = ""

    def clean(self) -> bool:
        return not self.non2xx and self.sock_errors in ("", "connect 0, read 0, write 0, timeout 0")


class Sink:
    """The syslog datagram sink HAProxy logs to (sink.py), pinned to the load core."""

    def __init__(self, wd: Path, cpu: str):
        self.path = wd / "log.sock"
        self.out = wd / "sink.log"
        # Real-time priority, so that it wakes at once on the busy load core:
        # a unix datagram socket queues only net.unix.max_dgram_qlen datagrams
        # (10 by default) and HAProxy drops the lines that do not fit. It
        # blocks in recv() between datagrams and does next to nothing per line.
        self.proc = start(["chrt", "-f", "10", str(VENV_PY), str(BENCH / "sink.py"),
                           str(self.path)], self.out, cpu)
        deadline = time.time() + 10
        while not self.path.exists():
            if self.proc.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the syslog sink did not start: {log_tail(self.out)}")
            time.sleep(0.05)

    def count(self) -> int:
        """Datagrams received so far (asks the sink with SIGUSR1, reads its answer)."""
        before = self.out.read_text().count("\n")
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.time() + 5
        while time.time() < deadline:
            lines = self.out.read_text().splitlines()
            if len(lines) > before:
                return int(lines[-1].split()[0])
            time.sleep(0.01)
        return -1


def wrk(sc: Scenario, port: int, duration: float, wrk_cpu: str, pid: int | None,
        sink: Sink | None = None) -> Run:
    cmd = wrk_cmd(port, sc.path, sc.conns, duration, wrk_cpu, sc.headers, sc.script)
    env = dict(os.environ, BENCH_BODY_SIZE=str(sc.body_size))
    sampler = Sampler(pid) if pid else None
    cpu0 = proc_cpu(pid) if pid else 0.0
    logged0 = sink.count() if sink else -1
    cores0 = core_busy()
    foreign = Foreign()
    t0 = time.monotonic()
    if sampler:
        sampler.start()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    wall = time.monotonic() - t0
    cores1 = core_busy()
    others = foreign.cores()
    cpu = (proc_cpu(pid) - cpu0) / wall if pid else 0.0
    if sampler:
        sampler.halt.set()
        sampler.join()
    if res.returncode != 0 or "Requests/sec" not in res.stdout:
        raise RuntimeError(f"wrk failed ({res.returncode}): {res.stdout}\n{res.stderr}")
    w = parse_wrk(res.stdout)
    mbps = w.rps * sc.body_size / 1e6 if sc.body_size else w.bps / 1e6
    core = {c: (cores1[c][0] - cores0[c][0]) / max(1, cores1[c][1] - cores0[c][1]) for c in cores1}
    value = w.rps if sc.unit == "req/s" else mbps
    if sink:
        time.sleep(0.1)            # the last datagrams of the run
    logged = sink.count() - logged0 if sink else -1
    return Run(value, w.rps, mbps, cpu, core, sampler.peak if sampler else 0, others, w.non2xx,
               w.socket_errors(), w.requests, logged, res.stdout)


def fmt(v: float, unit: str) -> str:
    return f"{v:,.0f}" if unit == "req/s" else f"{v:,.1f}"


# ---------------------------------------------------------------- main

MAX_VARIANTS = 4                   # hapymasters in one A/B run (--ref given up to 4 times)
ALL_PORTS = tuple(p + VARIANT_STEP * i for i in range(MAX_VARIANTS)
                  for p in (HAPY_HTTP, HAPY_TCP, HAPY_HTTP_LOG)) + (
    NGINX_PORT, HAP_HTTP, HAP_TCP, HAP_HTTP_LOG, HAP_PROBE, HAP_HTTP_SPLICE, HAP_TCP_SPLICE)


@dataclass
class Variant:
    """One hapymaster of the run: the working tree or a git ref, with its own ports."""
    label: str                     # "hapymaster" alone, "hapymaster <commit>" in an A/B run
    source: str                    # for the report
    env: dict
    index: int                     # its ports are the base ports + VARIANT_STEP * index


def idle_conn_memory(port: int, pid: int, n: int, children_of: int | None = None) -> tuple[int, int]:
    """RSS (KiB) of ``pid`` before and after ``n`` idle keep-alive client connections.

    Each connection makes one ``GET /small`` and then stays open, idle: the
    state a proxy keeps per idle keep-alive client (and the pooled server
    connection behind it, for both proxies alike). The connections are closed
    before returning.
    """
    socks: list[socket.socket] = []
    before = proc_rss_kib(pid)
    request = b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n"
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5.0)
            socks.append(s)
            s.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = s.recv(65536)
                if not chunk:
                    raise RuntimeError(f"port {port} closed an idle-memory connection")
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = s.recv(65536)
                if not chunk:
                    break
                body += chunk
        # Idle, as they stay: hapymaster gives an idle connection's request
        # parser back after 1 s (PARSER_IDLE), at the next sweeper tick.
        time.sleep(2.0)
        return before, proc_rss_kib(pid)
    finally:
        for s in socks:
            s.close()


def build_compiled(src: Path) -> None:
    """Build the mypyc modules of an exported ref in place, as its setup.py says (if it has any)."""
    setup_py = src / "setup.py"
    if not setup_py.exists() or "mypycify" not in setup_py.read_text():
        return
    print(f"# building the compiled modules of {src.name} (mypyc, ~20 s)", flush=True)
    subprocess.run([str(VENV_PY), "setup.py", "-q", "build_ext", "--inplace"], cwd=src, check=True,
                   stdout=subprocess.DEVNULL)


def port_answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def on_sigterm(*_) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: stop_all() must not be interrupted
    sys.exit(143)


def main() -> int:
    names = [s.name for s in SCENARIOS] + [s.name for s in reloads.SCENARIOS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-d", "--duration", type=float, default=5.0, help="seconds per wrk run (5)")
    ap.add_argument("-r", "--reps", type=int, default=3, help="runs per scenario and proxy (3)")
    ap.add_argument("-s", "--scenario", action="append",
                    help="only these scenarios (repeatable): " + ", ".join(names))
    ap.add_argument("--reload", action="store_true",
                    help="the reload scenarios (" + ", ".join(s.name for s in reloads.SCENARIOS)
                    + ") instead of the throughput ones")
    ap.add_argument("--ref", action="append",
                    help="benchmark this git ref of hapymaster (exported with git archive) instead "
                    "of the working tree; repeat for an A/B run (up to 4: each its own hapymaster, "
                    "all in alternation with HAProxy in one run); '.' is the working tree")
    ap.add_argument("--idle-conns", type=int, default=1000,
                    help="idle keep-alive client connections for the per-connection memory "
                    "figure (1000; 0: skip)")
    ap.add_argument("--cap", type=float, metavar="PERCENT",
                    help="layout 'capped': each proxy in its own cgroup limited to PERCENT of a "
                    "core (e.g. 40), for when the load core saturates first")
    ap.add_argument("--no-direct", action="store_true", help="skip the no-proxy baseline run")
    ap.add_argument("--proxy-cpu", default="0", help="core for the proxies (0)")
    ap.add_argument("--load-cpu", default="1", help="core for wrk, nginx and the log sink (1)")
    ap.add_argument("--max-foreign", type=float, default=0.10,
                    help="a run during which processes not ours used more than this many cores "
                    "is run again (0.10)")
    ap.add_argument("--quiet-wait", type=float, default=15.0,
                    help="before each run, wait up to this many seconds for the other processes "
                    "to be quiet (15)")
    ap.add_argument("--retries", type=int, default=2, help="how many times at most (2)")
    ap.add_argument("--no-save", action="store_true", help="do not write bench/results/")
    ap.add_argument("--keep", action="store_true",
                    help="keep everything running after the runs (Ctrl-C to stop), for profiling")
    reloads.add_arguments(ap)
    args = ap.parse_args()

    if args.scenario:
        bad = [n for n in args.scenario if n not in names]
        if bad:
            ap.error(f"unknown scenario {bad}; known: {names}")
        scenarios = [s for s in SCENARIOS if s.name in args.scenario]
        reload_scenarios = [s for s in reloads.SCENARIOS if s.name in args.scenario]
    elif args.reload:
        scenarios, reload_scenarios = [], list(reloads.SCENARIOS)
    else:
        scenarios, reload_scenarios = list(SCENARIOS), []

    wd = Path(tempfile.mkdtemp(prefix="hapybench."))
    cap = CpuCap(args.cap) if args.cap else None
    atexit.register(lambda: shutil.rmtree(wd, ignore_errors=True))
    if cap:
        atexit.register(cap.remove)
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, on_sigterm)
    busy = [p for p in ALL_PORTS if port_answers(p)]
    if busy:
        # HAProxy binds with SO_REUSEPORT: a leftover process on one of these
        # ports would silently take half the connections (and answer the probe).
        raise SystemExit(f"bench: something already listens on 127.0.0.1 port(s) {busy}; "
                         "stop it first")

    # Which hapymaster(s): the working tree (editable install) or exported refs.
    refs = args.ref or ["."]
    if len(refs) > MAX_VARIANTS:
        ap.error(f"--ref: at most {MAX_VARIANTS}")
    variants = []
    for i, ref in enumerate(refs):
        env = dict(os.environ)
        env.pop("HAPYMASTER_PROFILE", None)
        # `python -m` puts the current directory (the repository, where
        # bench/run is started) first on sys.path: every variant would import
        # the working tree. Safe path: only PYTHONPATH, then the venv.
        env["PYTHONSAFEPATH"] = "1"
        if ref != ".":
            src = wd / f"src{i}"
            src.mkdir()
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref],
                                    check=True, capture_output=True, text=True).stdout.strip()
            # setup.py and pyproject.toml where the ref has them (older ones do not).
            paths = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", ref, "--",
                                    "hapymaster", "setup.py", "pyproject.toml"], check=True,
                                   capture_output=True, text=True).stdout.split()
            subprocess.run(f"git -C {REPO} archive {ref} {' '.join(paths)} | tar -x -C {src}",
                           shell=True, check=True)
            build_compiled(src)
            # Ahead of the editable install's finder, which is on sys.meta_path after PathFinder.
            env["PYTHONPATH"] = str(src)
            source = f"git {commit} (exported with git archive, its compiled modules built)"
        else:
            commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                    capture_output=True, text=True).stdout.strip()
            dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                    "hapymaster"], capture_output=True, text=True).stdout.strip()
            source = f"working tree at {commit}" + (" + uncommitted changes in hapymaster/"
                                                    if dirty else " (clean)")
            commit = "worktree"
        if os.environ.get("BENCH_PROFILE"):
            env["HAPYMASTER_PROFILE"] = os.environ["BENCH_PROFILE"]
        # Byte-compiled, as the Debian package runs it (it compiles at
        # install). This machine sets PYTHONDONTWRITEBYTECODE: the master and
        # the worker template would compile every module from source at each
        # start, and the template's heap, which its workers share, would keep
        # what the compiler used (~1.5 MiB of a worker's RSS).
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        package = (src if ref != "." else REPO) / "hapymaster"
        subprocess.run([str(VENV_PY), "-m", "compileall", "-q", str(package)], env=env,
                       check=True)
        label = "hapymaster" if len(refs) == 1 else f"hapymaster {commit}"
        variants.append(Variant(label, source, env, i))
    env = variants[0].env          # the reload scenarios run the first one
    info = machine_info("; ".join(f"{v.label}: {v.source}" if len(variants) > 1 else v.source
                                  for v in variants))
    layout = (f"proxies pinned to cpu {args.proxy_cpu}, wrk, nginx and the log sink to cpu "
              f"{args.load_cpu}" + (f"; {cap.describe()}" if cap else "; no CPU cap"))
    layout_name = f"capped {args.cap:g}%" if cap else "pinned"

    nginx = start(["nginx", "-c", str(write_origin(wd)), "-p", str(wd)], wd / "nginx.log",
                  args.load_cpu)
    wait_port(NGINX_PORT, nginx, "nginx")
    OURS[:] = [nginx.pid]

    sections: list[str] = []
    if scenarios:
        sections.append(run_throughput(args, wd, variants, scenarios, cap, layout, layout_name))
    if reload_scenarios:
        sections.append(reloads.run(args, wd, env, reload_scenarios, cap, layout, layout_name))

    L = [f"# hapymaster vs HAProxy — {info['date']}", "", *machine_table(info), "",
         f"Command: `bench/run {' '.join(sys.argv[1:])}`".replace("` ", "`").rstrip(), "",
         f"Layout **{layout_name}**: {layout}.", ""]
    report = "\n".join(L) + "\n" + "\n".join(sections)
    print("\n" + "\n".join(part.split("\n<!-- details -->", 1)[0] for part in
                           ["\n".join(L)] + sections))
    if not args.no_save:
        out = BENCH / "results" / (dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d-%H%M") + ".md")
        out.parent.mkdir(exist_ok=True)
        out.write_text(report)
        print(f"written to {out.relative_to(REPO)}")
    return 0


def run_throughput(args, wd: Path, variants: list[Variant], scenarios: list[Scenario],
                   cap: CpuCap | None, layout: str, layout_name: str) -> str:
    logged = any(sc.logged for sc in scenarios)
    sink = Sink(wd, args.load_cpu) if logged else None
    masters = {}
    for v in variants:
        suffix = f"-{v.index}" if v.index else ""
        hapy_cfg = write_hapymaster(wd, workers=1, log_sink=sink.path if sink else None,
                                    variant=v.index)
        masters[v.label] = start([str(VENV_PY), "-m", "hapymaster", "-f", str(hapy_cfg), "-S",
                                  str(wd / f"master{suffix}.sock")], wd / f"hapymaster{suffix}.log",
                                 args.proxy_cpu, env=v.env, cap=cap, cap_name=f"hapymaster{suffix}")
    haproxy = start(["haproxy", "-db", "-f", str(write_haproxy(wd, 1, sink.path if sink else None))],
                    wd / "haproxy.log", args.proxy_cpu, cap=cap, cap_name="haproxy")
    pids: dict[str, int] = {}
    for v in variants:
        suffix = f"-{v.index}" if v.index else ""
        wait_serving(HAPY_HTTP + VARIANT_STEP * v.index, masters[v.label], v.label)
        # The worker, as the master CLI lists it (not "the master's child": a fork
        # server may stand between them). Affinity and cgroup are inherited.
        workers = show_proc(wd / f"master{suffix}.sock").workers
        if len(workers) != 1:
            raise SystemExit(f"expected one worker under {v.label} master "
                             f"{masters[v.label].pid}, got {workers}")
        pids[v.label] = workers[0]
    wait_serving(HAP_HTTP, haproxy, "haproxy")
    pids["haproxy"] = haproxy.pid
    procs = list(masters.values()) + [haproxy]
    OURS[1:] = [p.pid for p in procs] + ([sink.proc.pid] if sink else [])
    print(f"# workdir {wd}; " + ", ".join(f"{v.label} master {masters[v.label].pid} worker "
                                          f"{pids[v.label]}" for v in variants)
          + f", haproxy {haproxy.pid}; layout {layout_name}: {layout}", flush=True)
    idle_rss = {name: proc_rss_kib(pid) for name, pid in pids.items()}
    private = {name: smaps_private_kib(pid) for name, pid in pids.items()}
    offsets = {v.label: VARIANT_STEP * v.index for v in variants}

    def port(name: str, sc: Scenario) -> int:
        if name in offsets:
            return offsets[name] + (HAPY_TCP if sc.tcp else HAPY_HTTP_LOG if sc.logged
                                    else HAPY_HTTP)
        if sc.splice:
            return HAP_TCP_SPLICE if sc.tcp else HAP_HTTP_SPLICE
        return HAP_TCP if sc.tcp else HAP_HTTP_LOG if sc.logged else HAP_HTTP

    conn_mem: dict[str, tuple[int, int]] = {}
    if args.idle_conns:
        for name, pid in pids.items():
            http = offsets[name] + HAPY_HTTP if name in offsets else HAP_HTTP
            conn_mem[name] = idle_conn_memory(http, pid, args.idle_conns)
            b, a = conn_mem[name]
            print(f"# {name}: {args.idle_conns} idle keep-alive connections: RSS {b / 1024:.1f} -> "
                  f"{a / 1024:.1f} MiB, {(a - b) / args.idle_conns:.2f} KiB per connection",
                  flush=True)
        time.sleep(1.0)            # the proxies see the closes before the first run
    results: dict[str, dict[str, list[Run]]] = {}
    direct: dict[str, Run] = {}
    for sc in scenarios:
        print(f"\n## {sc.name}: {sc.title} (wrk -t1 -c{sc.conns}, {args.duration:g}s x {args.reps})",
              flush=True)
        results[sc.name] = {p: [] for p in pids}
        if not args.no_direct:
            direct[sc.name] = wrk(sc, NGINX_PORT, min(args.duration, 3), args.load_cpu, None)
            print(f"  direct to nginx (no proxy)  {fmt(direct[sc.name].value, sc.unit):>10} {sc.unit}",
                  flush=True)
        for name, pid in pids.items():   # warm up: pools, caches, allocator
            wrk(sc, port(name, sc), 1, args.load_cpu, pid)
        for rep in range(args.reps):
            order = list(pids) if rep % 2 == 0 else list(reversed(pids))
            for name in order:
                pid = pids[name]
                if any(p.poll() is not None for p in procs):
                    raise SystemExit("a proxy died during the runs; see the logs in " + str(wd))
                run_sink = sink if sc.logged and name == "haproxy" else None
                # On a shared machine: a run during which other processes took CPU is run
                # again; the least disturbed attempt is kept (and its "others" reported).
                attempts: list[Run] = []
                for attempt in range(1 + args.retries):
                    wait_quiet(args.max_foreign / 2, args.quiet_wait)
                    attempts.append(wrk(sc, port(name, sc), args.duration, args.load_cpu, pid,
                                        run_sink))
                    r = attempts[-1]
                    if r.foreign <= args.max_foreign or attempt == args.retries:
                        break
                    print(f"  run {rep + 1} {name:<11} {fmt(r.value, sc.unit):>10} {sc.unit}   "
                          f"disturbed: other processes used {r.foreign:.2f} core, again", flush=True)
                    time.sleep(1)
                r = min(attempts, key=lambda a: a.foreign)
                results[sc.name][name].append(r)
                note = "" if r.clean() else f"  !! non-2xx {r.non2xx}, socket errors: {r.sock_errors}"
                if r.logged >= 0:
                    note += f"  log lines {r.logged:,} for {r.requests:,} requests"
                print(f"  run {rep + 1} {name:<11} {fmt(r.value, sc.unit):>10} {sc.unit}   "
                      f"proxy cpu {r.cpu:4.0%}  core busy "
                      f"{' '.join(f'{c}:{v:.0%}' for c, v in sorted(r.core.items()))}  "
                      f"rss {r.rss_kib / 1024:.1f} MiB  others {r.foreign:.2f}{note}", flush=True)

    if args.keep:
        print(f"\n# --keep: everything still running (pids {pids}); Ctrl-C to stop",
              flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass

    logs = {v.label: log_tail(wd / (f"hapymaster-{v.index}.log" if v.index else "hapymaster.log"))
            for v in variants}
    logs["haproxy"] = log_tail(wd / "haproxy.log")
    for proc in procs + ([sink.proc] if sink else []):
        stop(proc)
    del OURS[1:]
    return render(args, scenarios, results, direct, idle_rss, private, conn_mem, logs,
                  layout_name, [v.label for v in variants])


def render(args, scenarios, results, direct, idle_rss, private, conn_mem, logs, layout_name,
           hapys: list[str]) -> str:
    L = [f"## Throughput (layout {layout_name})", "",
         f"Each figure is the median of {args.reps} runs of {args.duration:g}s (wrk -t1), proxies "
         f"alternating; 1 hapymaster worker, HAProxy nbthread 1. Access log off on both, except "
         "the `-log` scenarios: HAProxy `option httplog` to the bench's syslog sink (a unix "
         "datagram socket), hapymaster `global.access_log` with `target: syslog` to the same sink. "
         "\"cpu\" is the proxy process's CPU time over the run (1.00 = one core saturated); "
         f"\"load core\" is how busy cpu {args.load_cpu} (wrk + nginx) was: near 100% means "
         "the load side, not the proxy, was the limit.", ""]
    L += ["| scenario | unit | hapymaster | HAProxy | ratio | goal (issue 9) | hapymaster cpu | HAProxy cpu "
          "| load core (hapy / HAProxy) | no proxy | HAProxy splice | layout |"
          + (" hapymaster code |" if len(hapys) > 1 else ""),
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
          + ("---|" if len(hapys) > 1 else "")]
    load = int(args.load_cpu) if args.load_cpu.isdigit() else None
    for sc in scenarios:
        p = results[sc.name]["haproxy"]
        pm = statistics.median(r.value for r in p)
        for hapy in hapys:
            h = results[sc.name][hapy]
            hm = statistics.median(r.value for r in h)
            ratio = hm / pm if pm else float("nan")
            ok = "ok" if ratio >= sc.target else "**below**"
            lc = (f"{statistics.median(r.core.get(load, 0) for r in h):.0%} / "
                  f"{statistics.median(r.core.get(load, 0) for r in p):.0%}") if load is not None else "?"
            d = fmt(direct[sc.name].value, sc.unit) if sc.name in direct else "-"
            L.append(f"| {sc.name} | {sc.unit} | {fmt(hm, sc.unit)} | {fmt(pm, sc.unit)} | "
                     f"**{ratio:.2f}×** | ≥ {sc.target:.2f} {ok} | "
                     f"{statistics.median(r.cpu for r in h):.2f} | {statistics.median(r.cpu for r in p):.2f} | "
                     f"{lc} | {d} | {'splice-auto' if sc.splice else 'off'} | {layout_name} |"
                     + (f" {hapy} |" if len(hapys) > 1 else ""))
    names = hapys + ["haproxy"]
    L += ["", "Memory (RSS, MiB): idle after start → peak under load; \"private\" is the idle "
          "process's Private_Clean + Private_Dirty (/proc/PID/smaps_rollup: a hapymaster worker "
          "shares the rest with the worker template it was forked from)",
          "", "| scenario | " + " | ".join(n + (" worker" if n != "haproxy" else "")
                                          for n in names) + " |",
          "|---|" + "---:|" * len(names),
          "| idle | " + " | ".join(f"{idle_rss[n] / 1024:.1f}" for n in names) + " |",
          "| idle, private | " + " | ".join(f"{private[n] / 1024:.1f}" for n in names) + " |"]
    if conn_mem:
        L.append(f"| idle + {args.idle_conns} keep-alive clients, KiB per connection | "
                 + " | ".join(f"{(conn_mem[n][1] - conn_mem[n][0]) / args.idle_conns:.2f}"
                              for n in names) + " |")
    for sc in scenarios:
        L.append(f"| {sc.name} | " + " | ".join(
            f"{max(r.rss_kib for r in results[sc.name][n]) / 1024:.1f}" for n in names) + " |")
    errs = []
    for sc in scenarios:
        for name, runs in results[sc.name].items():
            for i, r in enumerate(runs):
                if not r.clean():
                    errs.append(f"- {sc.name} {name} run {i + 1}: non-2xx/3xx {r.non2xx}, "
                                f"socket errors: {r.sock_errors or 'none'}")
    L += ["", "Errors seen by wrk (non-2xx/3xx answers, socket errors):", ""]
    L += errs or ["- none"]
    for sc in scenarios:
        if sc.logged:
            runs = results[sc.name]["haproxy"]
            L.append(f"- {sc.name}: the syslog sink received {sum(r.logged for r in runs):,} lines "
                     f"for {sum(r.requests for r in runs):,} HAProxy requests (fewer: dropped; a few more or less: the edges of the run)")
    L += ["", "<!-- details -->", "### Throughput runs", ""]
    for sc in scenarios:
        L.append(f"#### {sc.name}: {sc.title}")
        L.append("")
        for name, runs in results[sc.name].items():
            L.append(f"- {name}: " + ", ".join(
                f"{fmt(r.value, sc.unit)} (cpu {r.cpu:.2f}, rss {r.rss_kib / 1024:.1f} MiB, "
                f"others {r.foreign:.2f})" for r in runs))
        if sc.name in direct:
            L.append(f"- no proxy: {fmt(direct[sc.name].value, sc.unit)} {sc.unit}")
        L.append("")
        last = results[sc.name][hapys[0]][-1].raw.strip()
        L += [f"<details><summary>last {hapys[0]} wrk output</summary>", "", "```", last, "```",
              "</details>", ""]
    for name, text in logs.items():
        tail = "\n".join(text.strip().splitlines()[-15:])
        L += [f"#### {name} log (last lines)", "", "```", tail or "(empty)", "```", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
