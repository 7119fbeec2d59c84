#!/usr/bin/env python3
"""The memory one idle keep-alive client connection costs a hapymaster worker (issue 9: <= 2 KiB).

    .venv/bin/python bench/idle_conn.py              # 1000 connections, 3 fresh masters
    .venv/bin/python bench/idle_conn.py -c 5000 -n 5
    .venv/bin/python bench/idle_conn.py --smaps 6    # and which mappings grew (first run)
    .venv/bin/python bench/idle_conn.py --src DIR    # the hapymaster/ package in DIR instead

The throughput bench's measurement (bench.py idle_conn_memory(): N clients
each make one GET /small and stay open; the worker's RSS growth after 2 s,
once the request parsers of idle connections were given back, divided by
N) in the set-up of bench/worker_rss.py: nginx as the origin, the bench's
hapymaster config with one worker, byte-compiled sources, no HAProxy or
wrk. A few seconds per run.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
from pathlib import Path

from bench import idle_conn_memory
from common import NGINX_PORT, start, wait_port
from configs import HAPY_HTTP, write_origin
from worker_rss import measuring_setup, serving_worker, smaps_by_name


def one_run(wd: Path, env: dict[str, str], run: int, conns: int,
            smaps: int) -> tuple[int, int]:
    """Start a master, open ``conns`` idle connections to its worker, stop it: RSS before, after."""
    with serving_worker(wd, env, run) as worker:
        maps_before = smaps_by_name(worker) if smaps else {}
        before, after = idle_conn_memory(HAPY_HTTP, worker, conns)
        if smaps:
            # idle_conn_memory closed its connections: these are the RSS at 2 s.
            grown = [(name, rss - maps_before.get(name, (0, 0))[0])
                     for name, (rss, _) in _last_maps.items()]
            print(f"# worker {worker}: mappings that grew with {conns} idle connections, KiB")
            for name, growth in sorted(grown, key=lambda kv: -kv[1])[:smaps]:
                print(f"{growth:8d}  {name}")
        return before, after


_last_maps: dict[str, tuple[int, int]] = {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", "--runs", type=int, default=3, help="fresh masters to measure (3)")
    ap.add_argument("-c", "--conns", type=int, default=1000,
                    help="idle keep-alive connections per run (1000, as bench/run)")
    ap.add_argument("--smaps", type=int, default=0, metavar="N",
                    help="print the N worker mappings that grew most (first run)")
    ap.add_argument("--src", type=Path, metavar="DIR",
                    help="run DIR/hapymaster (e.g. git archive of a ref, with the mypyc .so "
                    "files built in), not the working tree's")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.conns + 1000)), hard))
    wd, env = measuring_setup("idle_conn", args.src)
    nginx = start(["nginx", "-c", str(write_origin(wd)), "-p", str(wd)], wd / "nginx.log", None)
    wait_port(NGINX_PORT, nginx, "nginx")

    if args.smaps:
        # Read the worker's mappings at the end of idle_conn_memory's wait,
        # before it closes its connections.
        import bench
        measure = bench.proc_rss_kib

        def rss_and_maps(pid: int) -> int:
            _last_maps.clear()
            _last_maps.update(smaps_by_name(pid))
            return measure(pid)
        bench.proc_rss_kib = rss_and_maps
    figures = [one_run(wd, env, run, args.conns, args.smaps if run == 0 else 0)
               for run in range(args.runs)]
    per_conn = sorted((after - before) * 1024 / args.conns for before, after in figures)
    idle = sorted(before / 1024 for before, _ in figures)
    print(f"worker RSS before MiB: median {statistics.median(idle):.1f}  "
          f"(min {idle[0]:.1f}, max {idle[-1]:.1f})")
    print(f"per idle connection B: median {statistics.median(per_conn):.0f}  "
          f"(min {per_conn[0]:.0f}, max {per_conn[-1]:.0f}, {len(per_conn)} runs of "
          f"{args.conns} connections)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
