"""Reload scenarios: hapymaster (2 workers) and HAProxy (master-worker, nbthread 2)
reloaded under load, in the same run. See README.md "Reload scenarios".

Each proxy gets a ``reload()`` that returns when its new generation serves:
hapymaster's is the ``hapymaster reload`` command (it blocks until every new
worker is READY); HAProxy's is SIGUSR2 to the master, then polling a probe
frontend that answers with the PID of the process that accepted, until a PID
that was not a worker before the signal answers (and ``show proc`` lists it
as a current worker).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import shutil
import sys
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import (OURS, REPO, VENV, VENV_PY, CpuCap, Foreign, ProcList, WrkResult, children,
                    log_tail, parse_wrk, show_proc, start, stop, wait_port, wait_serving,
                    wrk_cmd)
from configs import HAP_HTTP, HAP_PROBE, HAPY_HTTP, HARD_STOP_AFTER, write_haproxy, write_hapymaster

WORKERS = 2                        # hapymaster workers; HAProxy nbthread (one worker process)
REPLY_TIMEOUT = 15.0               # a reload that has not served by then has failed


@dataclass
class ReloadScenario:
    name: str
    title: str


SCENARIOS = [
    ReloadScenario("reload-keepalive", "reloads at a steady pace, keep-alive clients"),
    ReloadScenario("reload-close", "reloads at a steady pace, `Connection: close` clients"),
    ReloadScenario("reload-storm", "a storm of reloads with a small client running"),
    ReloadScenario("reload-latency", "reload → every new worker serving, idle and under load"),
]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    g = ap.add_argument_group("reload scenarios (--reload, or -s reload-...)")
    g.add_argument("--reload-count", type=int, default=20,
                   help="reloads in reload-keepalive/-close (20)")
    g.add_argument("--reload-interval", type=float, default=1.0,
                   help="seconds between reload starts, under load (1)")
    g.add_argument("--reload-conns", type=int, default=256, help="wrk connections under load (256)")
    g.add_argument("--storm-count", type=int, default=100, help="reloads in reload-storm (100)")
    g.add_argument("--storm-rate", type=float, default=10.0,
                   help="reload-storm pace, reloads started per second (10)")
    g.add_argument("--storm-conns", type=int, default=16, help="wrk connections during the storm (16)")
    g.add_argument("--storm-timeout", type=float, default=60.0,
                   help="the storm stops asking for reloads after this many seconds (60)")
    g.add_argument("--latency-count", type=int, default=30,
                   help="reloads measured by reload-latency, idle and again under load (30)")
    g.add_argument("--dev-client", action="store_true",
                   help="time the development venv's `hapymaster reload` console script instead "
                   "of the client as the Debian package runs it (see reload_client)")
    g.add_argument("--haproxy-no-idle-close", action="store_true",
                   help="HAProxy without 'option idle-close-on-response' (closes idle client "
                   "connections at soft stop, as before 2.6)")


@dataclass
class Outcome:
    ok: bool
    seconds: float                 # asked -> new generation serving (or failed)
    ready: float | None = None     # hapymaster: the largest "READY in X s" it printed
    note: str = ""


# ---------------------------------------------------------------- the two proxies

SYSTEM_PYTHON = Path("/usr/bin/python3")


def reload_client(wd: Path, env: dict, dev: bool) -> tuple[list[str], dict]:
    """The ``hapymaster reload`` command line the bench times, and its environment.

    By default the client as the Debian package runs it: its /usr/bin/hapymaster
    (packaging/bin/hapymaster) under the distribution's python3 (no virtualenv
    and its editable-install finder, ~20 ms of start-up here), on a
    byte-compiled copy of the package (the .deb byte-compiles at install; this
    machine sets PYTHONDONTWRITEBYTECODE, so a plain run would recompile the
    modules every time). The client imports only the standard library, so the
    distribution's python3 is enough when it is the same minor version.
    ``--dev-client``: the development venv's console script instead.
    """
    same = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info[:2])"],
                          capture_output=True, text=True) if SYSTEM_PYTHON.exists() else None
    if dev or same is None or same.stdout.strip() != str(sys.version_info[:2]):
        return [str(VENV / "hapymaster")], env
    src = wd / "client-src"
    source = Path(env["PYTHONPATH"].split(os.pathsep)[0]) if env.get("PYTHONPATH") else REPO
    shutil.copytree(source / "hapymaster", src / "hapymaster",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([str(SYSTEM_PYTHON), "-m", "compileall", "-q", str(src)], check=True)
    client_env = {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    client_env["PYTHONPATH"] = str(src)
    return [str(SYSTEM_PYTHON), str(REPO / "packaging" / "bin" / "hapymaster")], client_env


class Hapymaster:
    name = "hapymaster"
    port = HAPY_HTTP

    def __init__(self, wd: Path, env: dict, args, cap: CpuCap | None):
        self.sock = wd / "master.sock"
        self.env, self.load_cpu = env, args.load_cpu
        self.client, self.client_env = reload_client(wd, env, args.dev_client)
        self.log = wd / "hapymaster.log"
        cfg = write_hapymaster(wd, workers=WORKERS)
        self.proc = start([str(VENV_PY), "-m", "hapymaster", "-f", str(cfg), "-S", str(self.sock)],
                          self.log, args.proxy_cpu, env=env, cap=cap, cap_name="hapymaster")
        wait_serving(self.port, self.proc, "hapymaster")

    def reload(self) -> Outcome:
        # The command an operator (and ExecReload=) runs, on the load core
        # (anywhere: the "both cores" pass); its start-up is part of what is measured.
        pin = ["taskset", "-c", self.load_cpu] if self.load_cpu is not None else []
        cmd = [*pin, *self.client, "reload", "-S", str(self.sock)]
        t0 = time.monotonic()
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, env=self.client_env,
                                 timeout=REPLY_TIMEOUT)
        except subprocess.TimeoutExpired:
            return Outcome(False, time.monotonic() - t0, note="no answer in time")
        seconds = time.monotonic() - t0
        ready = [float(x) for x in re.findall(r"READY in ([\d.]+)s", res.stdout)]
        note = "" if res.returncode == 0 else (res.stderr.strip().splitlines() or ["?"])[-1][:200]
        return Outcome(res.returncode == 0, seconds, max(ready) if ready else None, note)

    def procs(self) -> ProcList:
        return show_proc(self.sock)


class Haproxy:
    name = "HAProxy"
    port = HAP_HTTP

    def __init__(self, wd: Path, args, cap: CpuCap | None):
        self.sock = wd / "haproxy-master.sock"
        self.log = wd / "haproxy.log"
        cfg = write_haproxy(wd, nbthread=WORKERS, idle_close=not args.haproxy_no_idle_close)
        self.proc = start(["haproxy", "-W", "-db", "-S", str(self.sock), "-f", str(cfg)], self.log,
                          args.proxy_cpu, cap=cap, cap_name="haproxy")
        wait_serving(self.port, self.proc, "haproxy")
        wait_port(HAP_PROBE, self.proc, "haproxy")

    @staticmethod
    def probe() -> int | None:
        """PID of the HAProxy process that accepted a new connection on the probe frontend."""
        try:
            with socket.create_connection(("127.0.0.1", HAP_PROBE), timeout=1.0) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            body = data.split(b"\r\n\r\n", 1)[1].strip()
            return int(body) if body.isdigit() else None
        except (OSError, IndexError):
            return None

    def reload(self) -> Outcome:
        before = set(self.procs().workers)
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGUSR2)
        deadline = t0 + REPLY_TIMEOUT
        while time.monotonic() < deadline:
            pid = self.probe()
            if pid is not None and pid not in before:
                seconds = time.monotonic() - t0
                # Not counted in the time: that the master lists it as a current worker.
                while time.monotonic() < deadline:
                    if pid in self.procs().workers:
                        return Outcome(True, seconds)
                    time.sleep(0.005)
                return Outcome(False, seconds, note=f"pid {pid} served but is not a current worker")
            time.sleep(0.002)
        return Outcome(False, time.monotonic() - t0, note="no new worker served in time")

    def procs(self) -> ProcList:
        return show_proc(self.sock)


def settle(proxy, timeout: float) -> None:
    """Wait until the proxy has no old workers left (the previous run's are gone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proxy.procs().old:
            return
        time.sleep(0.1)


# ---------------------------------------------------------------- load

class Load:
    """wrk for as long as it takes: started with a long -d, stopped by SIGINT
    (wrk then prints its summary as at the end of -d)."""

    def __init__(self, port: int, conns: int, headers: tuple[str, ...], cpu: str):
        self.proc = subprocess.Popen(wrk_cmd(port, "/small", conns, 3600, cpu, headers),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.t0 = time.monotonic()

    def stop(self) -> tuple[WrkResult, str]:
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=30)
        if "Requests/sec" not in out:
            raise RuntimeError(f"wrk failed ({self.proc.returncode}): {out}\n{err}")
        return parse_wrk(out), out


@dataclass
class Result:
    proxy: str
    asked: int
    outcomes: list[Outcome] = field(default_factory=list)
    wrk: WrkResult | None = None
    wrk_raw: str = ""
    elapsed: float = 0.0           # first reload asked -> last one served
    others: float = 0.0            # CPU of processes not ours, in cores
    procs: ProcList | None = None  # the master's view at the end

    @property
    def done(self) -> int:
        return sum(o.ok for o in self.outcomes)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def times(self) -> list[float]:
        return [o.seconds for o in self.outcomes if o.ok]

    def ready(self) -> list[float]:
        return [o.ready for o in self.outcomes if o.ok and o.ready is not None]


def paced(proxy, result: Result, count: int, interval: float, give_up: float) -> None:
    """Reload ``count`` times, the i-th asked at start + i * interval (or as soon as the
    previous one has served, when it is late); none asked after ``give_up`` seconds."""
    t0 = time.monotonic()
    for i in range(count):
        now = time.monotonic()
        if now - t0 > give_up:
            break
        if proxy.proc.poll() is not None:
            raise SystemExit(f"{proxy.name}'s master exited ({proxy.proc.returncode}) during the "
                             f"reloads:\n{log_tail(proxy.log)}")
        time.sleep(max(0.0, t0 + i * interval - now))
        result.outcomes.append(proxy.reload())
    result.elapsed = time.monotonic() - t0


def under_load(proxy, conns: int, headers: tuple[str, ...], count: int, interval: float,
               give_up: float, cpu: str) -> Result:
    settle(proxy, 30)
    result = Result(proxy.name, count)
    foreign = Foreign()
    load = Load(proxy.port, conns, headers, cpu)
    time.sleep(1.0)                # every connection open and busy before the first reload
    paced(proxy, result, count, interval, give_up)
    time.sleep(1.0)                # what the last generation swap left in flight
    result.wrk, result.wrk_raw = load.stop()
    result.others = foreign.cores()
    result.procs = proxy.procs()
    return result


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (its template, spare, workers...)."""
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo += children(found[-1])
    return found


def on_cpus(proxy, cpus: set[int]) -> None:
    """Move the proxy's processes (new ones inherit it) to ``cpus``."""
    for pid in descendants(proxy.proc.pid):
        try:
            os.sched_setaffinity(pid, cpus)
        except OSError:
            pass       # gone meanwhile


def idle_latency_both_cores(proxy, count: int, pinned: str) -> Result:
    """idle_latency with the proxy (and hapymaster's client) on every core, as on
    an idle machine nobody pinned anything on; pinned back afterwards."""
    everything = set(range(os.cpu_count() or 1))
    load_cpu = getattr(proxy, "load_cpu", None)
    on_cpus(proxy, everything)
    if load_cpu is not None:
        proxy.load_cpu = None
    try:
        result = idle_latency(proxy, count)
    finally:
        on_cpus(proxy, {int(cpu) for cpu in pinned.split(",")})
        if load_cpu is not None:
            proxy.load_cpu = load_cpu
    result.proxy += " (both cores)"
    return result


def idle_latency(proxy, count: int) -> Result:
    result = Result(proxy.name, count)
    foreign = Foreign()
    t0 = time.monotonic()
    for _ in range(count):
        settle(proxy, 10)          # the previous generation gone: an idle machine
        time.sleep(0.2)
        result.outcomes.append(proxy.reload())
    result.elapsed = time.monotonic() - t0
    result.others = foreign.cores()
    result.procs = proxy.procs()
    return result


# ---------------------------------------------------------------- run

def run(args, wd: Path, env: dict, scenarios: list[ReloadScenario], cap: CpuCap | None,
        layout: str, layout_name: str) -> str:
    wd = wd / "reload"
    wd.mkdir()
    hapy = Hapymaster(wd, env, args, cap)
    hap = Haproxy(wd, args, cap)
    OURS[1:] = [hapy.proc.pid, hap.proc.pid]
    print(f"\n# reload scenarios: hapymaster master {hapy.proc.pid} ({WORKERS} workers), HAProxy "
          f"master {hap.proc.pid} (-W, nbthread {WORKERS}); layout {layout_name}: {layout}",
          flush=True)
    hard_stop = float(HARD_STOP_AFTER.rstrip("s"))
    results: dict[str, list[Result]] = {}
    for i, sc in enumerate(scenarios):
        proxies = [hapy, hap] if i % 2 == 0 else [hap, hapy]
        print(f"\n## {sc.name}: {sc.title}", flush=True)
        results[sc.name] = []
        for proxy in proxies:
            if sc.name in ("reload-keepalive", "reload-close"):
                headers = ("Connection: close",) if sc.name == "reload-close" else ()
                r = under_load(proxy, args.reload_conns, headers, args.reload_count,
                               args.reload_interval, args.reload_count * args.reload_interval
                               + 30, args.load_cpu)
                results[sc.name].append(r)
                print("  " + line_under_load(r), flush=True)
            elif sc.name == "reload-storm":
                r = under_load(proxy, args.storm_conns, (), args.storm_count, 1 / args.storm_rate,
                               args.storm_timeout, args.load_cpu)
                results[sc.name].append(r)
                print("  " + line_under_load(r), flush=True)
            else:
                r = idle_latency(proxy, args.latency_count)
                results[sc.name].append(r)
                print(f"  {r.proxy:<10} idle:  {line_latency(r)}", flush=True)
                if args.proxy_cpu is not None:
                    r = idle_latency_both_cores(proxy, args.latency_count, args.proxy_cpu)
                    results[sc.name].append(r)
                    print(f"  {r.proxy:<10} idle:  {line_latency(r)}", flush=True)
                r = under_load(proxy, args.reload_conns, (), args.latency_count,
                               args.reload_interval, args.latency_count * args.reload_interval + 30,
                               args.load_cpu)
                r.proxy += " (loaded)"
                results[sc.name].append(r)
                print(f"  {r.proxy:<10} {line_latency(r)}; {line_under_load(r)}", flush=True)
            settle(proxy, hard_stop + 5)
    tails = {p.name: log_tail(p.log) for p in (hapy, hap)}
    stop(hapy.proc)
    stop(hap.proc)
    del OURS[1:]
    return render(args, scenarios, results, tails, layout_name)


# ---------------------------------------------------------------- report

def ms(v: float) -> str:
    return f"{v * 1000:,.0f} ms"


def line_latency(r: Result) -> str:
    t = r.times()
    if not t:
        return f"0 of {r.asked} reloads served"
    out = f"{len(t)}/{r.asked} reloads, median {ms(statistics.median(t))}, max {ms(max(t))}"
    if r.ready():
        out += (f" (READY in: median {ms(statistics.median(r.ready()))}, "
                f"max {ms(max(r.ready()))})")
    return out


def line_under_load(r: Result) -> str:
    w = r.wrk
    return (f"{r.proxy:<10} {r.done}/{r.asked} reloads in {r.elapsed:.1f}s, {len(r.failed)} failed"
            f"{'' if len(r.outcomes) == r.asked else f' (gave up after {len(r.outcomes)})'}; "
            f"wrk {w.rps:,.0f} req/s, {w.requests:,} requests, errors: {w.socket_errors()}, "
            f"non-2xx {w.non2xx}; others {r.others:.2f}")


def render(args, scenarios, results: dict[str, list[Result]], tails: dict[str, str],
           layout_name: str) -> str:
    L = [f"## Reloads (layout {layout_name})", "",
         f"hapymaster `global.workers: {WORKERS}`; HAProxy 2.6 in master-worker mode (`-W -S`) with "
         f"`nbthread {WORKERS}` in its one worker process (2.6 has no nbproc), "
         f"`option idle-close-on-response` {'off' if args.haproxy_no_idle_close else 'on'}; "
         f"both `hard-stop-after {HARD_STOP_AFTER}`, access log off. One run per scenario and "
         "proxy. Reload → serving: hapymaster, the wall time of `hapymaster reload` (it returns "
         "when every new worker is READY; READY in = what it prints), "
         + ("the development venv's console script" if args.dev_client else
            "run as the Debian package runs it: its /usr/bin/hapymaster "
            "(packaging/bin/hapymaster) under /usr/bin/python3 on a byte-compiled copy "
            "(`--dev-client`: the venv's console script)")
         + "; HAProxy, SIGUSR2 → a new "
         "worker PID answers on the probe frontend. wrk -t1 on the load core.", ""]
    goals = {"reload-keepalive": "0 failed requests", "reload-close": "0 failed requests",
             "reload-storm": f"all {args.storm_count} done on time, 0 failed requests"}
    rows = [(sc.name, r) for sc in scenarios for r in results[sc.name]
            if sc.name != "reload-latency" or "loaded" in r.proxy]
    if rows:
        L += ["| scenario | proxy | wrk -c | reloads done / planned | in | failed reloads | req/s "
              "| requests | connect | read | write | timeout | non-2xx | reload → serving median "
              "/ max | others | goal (issue 8) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in rows:
            w, t = r.wrk, r.times()
            conns = args.storm_conns if name == "reload-storm" else args.reload_conns
            lat = f"{ms(statistics.median(t))} / {ms(max(t))}" if t else "-"
            goal = ""
            if r.proxy.startswith("hapymaster") and name in goals:
                on_time = (name != "reload-storm"
                           or (r.done == r.asked
                               and r.elapsed <= r.asked / args.storm_rate + 1.0))
                met = w.errors == 0 and not r.failed and on_time
                goal = f"{goals[name]}: {'**met**' if met else '**not met**'}"
            gave_up = "" if len(r.outcomes) == r.asked else f" (gave up after {len(r.outcomes)})"
            L.append(f"| {name} | {r.proxy} | {conns} | {r.done} / {r.asked} | {r.elapsed:.1f} s"
                     f"{gave_up} | "
                     f"{len(r.failed)} | {w.rps:,.0f} | {w.requests:,} | {w.connect} | {w.read} | "
                     f"{w.write} | {w.timeout} | {w.non2xx} | {lat} | {r.others:.2f} | {goal} |")
        L.append("")
    if "reload-latency" in results:
        rs = results["reload-latency"]
        L += ["Reload → every new worker serving (reload-latency; idle: each reload once the "
              "previous generation has left, with the proxy pinned as in the layout; idle on "
              "both cores: the same with the proxy's processes and hapymaster's client "
              "allowed on every core, as on an idle machine nobody pinned anything on; loaded: one per "
              f"{args.reload_interval:g} s under wrk -c{args.reload_conns} keep-alive):", "",
              "| proxy | machine | reloads | median | max | READY in (printed): median / max "
              "| goal (issue 8) |", "|---|---|---:|---:|---:|---:|---|"]
        machines = {" (loaded)": "256-conn load", " (both cores)": "idle, proxy and client "
                    "on both cores (unpinned)", "": "idle"}
        for r in rs:
            loaded = "loaded" in r.proxy
            t, ready = r.times(), r.ready()
            suffix = next(k for k in machines if r.proxy.endswith(k))
            name = r.proxy[:len(r.proxy) - len(suffix)] if suffix else r.proxy
            goal = ""
            if name == "hapymaster" and t:
                bound = 0.150 if loaded else 0.050
                goal = (f"median ≤ {ms(bound)}: "
                        f"{'**met**' if statistics.median(t) <= bound else '**not met**'}")
            L.append(f"| {name} | {machines[suffix]} | {len(t)} / {r.asked} | "
                     f"{ms(statistics.median(t)) if t else '-'} | {ms(max(t)) if t else '-'} | "
                     + (f"{ms(statistics.median(ready))} / {ms(max(ready))}" if ready else "-")
                     + f" | {goal} |")
        L.append("")
    failures = [f"- {name} {r.proxy}: {o.note}" for name, rr in results.items() for r in rr
                for o in r.failed]
    L += ["Failed reloads:", ""] + (sorted(set(failures))[:20] or ["- none"]) + [""]
    L += ["<!-- details -->", "### Reload runs", ""]
    for name, rr in results.items():
        for r in rr:
            procs = r.procs
            L.append(f"- {name} {r.proxy}: {line_latency(r)}"
                     + (f"; master says reloads {procs.reloads} [failed: {procs.failed}], "
                        f"{len(procs.workers)} workers, {len(procs.old)} old" if procs else ""))
            L.append("  - every reload, ms: " + " ".join(f"{o.seconds * 1000:.0f}"
                                                       + ("" if o.ok else "!") for o in r.outcomes))
    L.append("")
    for name, rr in results.items():
        for r in rr:
            if r.wrk_raw:
                L += [f"<details><summary>{name} {r.proxy}: wrk output</summary>", "", "```",
                      r.wrk_raw.strip(), "```", "</details>", ""]
    for who, tail in tails.items():
        tail = "\n".join(tail.strip().splitlines()[-15:])
        L += [f"#### {who} log (last lines)", "", "```", tail or "(empty)", "```", ""]
    return "\n".join(L)
