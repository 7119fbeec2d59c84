#!/usr/bin/env python3
"""The idle RSS of one hapymaster worker, and where it goes (issue 9: <= 20 MiB).

    .venv/bin/python bench/worker_rss.py            # worker and template VmRSS, private
    .venv/bin/python bench/worker_rss.py --smaps 15 # and the worker's largest mappings
    .venv/bin/python bench/worker_rss.py -n 5       # five fresh masters: min / median / max
    .venv/bin/python bench/worker_rss.py --src DIR  # the hapymaster/ package in DIR instead

The same set-up as the throughput bench's "idle" row (bench/run), without
HAProxy and wrk: nginx as the origin, the bench's hapymaster config with one
worker, byte-compiled sources, the worker's RSS once one GET /small went
through it. A few seconds per run, so that an import or a malloc setting can
be tried and measured in a loop.
"""

from __future__ import annotations

import argparse
import contextlib
import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Iterator

from common import (NGINX_PORT, REPO, VENV_PY, proc_rss_kib, show_proc, smaps_private_kib, start,
                    stop, stop_all, wait_port, wait_serving)
from bench import port_answers
from configs import HAPY_HTTP, write_hapymaster, write_origin


def smaps_by_name(pid: int) -> dict[str, tuple[int, int]]:
    """{mapping name: (Rss KiB, Private KiB)} summed over the mappings of that name."""
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and ":" not in fields[0]:   # a mapping's header line
            name = fields[5] if len(fields) > 5 else "[anon]"
        elif fields[0] == "Rss:":
            sizes[name][0] += int(fields[1])
        elif fields[0] in ("Private_Clean:", "Private_Dirty:"):
            sizes[name][1] += int(fields[1])
    return {name: (rss, private) for name, (rss, private) in sizes.items()}


def template_pid(worker: int) -> int | None:
    """The worker template: the master's child named hapymaster-tmpl."""
    master = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if "(hapymaster-tmpl)" in stat and int(stat.rsplit(")", 1)[1].split()[1]) == master:
                return int(entry.name)
    return None


@contextlib.contextmanager
def serving_worker(wd: Path, env: dict[str, str], run: int) -> Iterator[int]:
    """A master with the bench's config and one worker, serving: the worker's pid; then stopped."""
    conf = write_hapymaster(wd, workers=1)
    master = start([str(VENV_PY), "-m", "hapymaster", "-f", str(conf), "-S",
                    str(wd / "master.sock")], wd / f"hapymaster-{run}.log", None, env=env)
    try:
        wait_serving(HAPY_HTTP, master, "hapymaster")
        worker = show_proc(wd / "master.sock").workers[0]
        time.sleep(0.5)   # what the worker does right after its first request is done
        yield worker
    finally:
        stop(master)


def one_run(wd: Path, env: dict[str, str], run: int, smaps: int) -> tuple[int, int, int]:
    """Start a master, measure its worker once serving, stop it: (RSS, private, template RSS)."""
    with serving_worker(wd, env, run) as worker:
        rss, private = proc_rss_kib(worker), smaps_private_kib(worker)
        tmpl = template_pid(worker)
        tmpl_rss = proc_rss_kib(tmpl) if tmpl else 0
        if smaps:
            print(f"# worker {worker}: largest mappings, Rss / private KiB")
            top = sorted(smaps_by_name(worker).items(), key=lambda kv: -kv[1][0])[:smaps]
            for name, (size, own) in top:
                print(f"{size:8d} {own:8d}  {name}")
        return rss, private, tmpl_rss


def measuring_setup(tool: str, src: Path | None) -> tuple[Path, dict[str, str]]:
    """A work directory and the environment to start masters in (this and idle_conn.py).

    Refuses while a bench/run holds the ports; byte-compiles the code measured.
    """
    busy = [port for port in (NGINX_PORT, HAPY_HTTP) if port_answers(port)]
    if busy:
        # A bench/run going on (same ports): its nginx would answer for ours,
        # and a master of ours would share its listeners (SO_REUSEPORT).
        raise SystemExit(f"{tool}: something already listens on 127.0.0.1 port(s) {busy}; "
                         "wait for it to finish")
    wd = Path(tempfile.mkdtemp(prefix=f"hapy-{tool}-"))
    atexit.register(lambda: shutil.rmtree(wd, ignore_errors=True))
    atexit.register(stop_all)
    # `python -m` puts the current directory first on sys.path: run from the
    # repository, the master would import the working tree whatever --src says.
    os.chdir(wd)
    env = dict(os.environ)
    env.pop("HAPYMASTER_PROFILE", None)
    # Byte-compiled, as the package runs (see bench.py): compiling at start-up
    # leaves the compiler's garbage in the template's heap, which workers share.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if src:
        # Ahead of the editable install's finder, which is on sys.meta_path after PathFinder.
        env["PYTHONPATH"] = str(src.resolve())
    package = (src.resolve() if src else REPO) / "hapymaster"
    subprocess.run([str(VENV_PY), "-m", "compileall", "-q", str(package)], env=env, check=True)
    return wd, env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=3, help="fresh masters to measure (3)")
    ap.add_argument("--smaps", type=int, default=0, metavar="N",
                    help="print the worker's N largest mappings (first run)")
    ap.add_argument("--src", type=Path, metavar="DIR",
                    help="run DIR/hapymaster (e.g. git archive of a ref, with the mypyc .so "
                    "files copied in), not the working tree's")
    args = ap.parse_args()
    wd, env = measuring_setup("worker_rss", args.src)
    nginx = start(["nginx", "-c", str(write_origin(wd)), "-p", str(wd)], wd / "nginx.log", None)
    wait_port(NGINX_PORT, nginx, "nginx")
    figures = [one_run(wd, env, run, args.smaps if run == 0 else 0) for run in range(args.runs)]
    for label, column in (("worker RSS", 0), ("worker private", 1), ("template RSS", 2)):
        values = sorted(f[column] / 1024 for f in figures)
        print(f"{label:15s} MiB: median {statistics.median(values):.1f}  "
              f"(min {values[0]:.1f}, max {values[-1]:.1f}, {len(values)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
