"""Worker process entry: ``run()``, called in a worker forked from the worker
template (hapymaster/forkserver.py), or ``python -m hapymaster.worker`` (a
fresh interpreter: tests, debugging), which calls the same ``run()``.

1. Forked: the config the template parsed comes with the fork. Fresh
   interpreter: read the boot message (one JSON line) from the control
   socketpair whose fd is in HAPYMASTER_CONTROL_FD and parse the config text
   the master validated.
2. Drop privileges if asked; build backends and frontends.
3. Forked: now read the boot message (the master sends it once it has the
   previous generation's runtime state). Apply that state, attach to the
   inherited listeners, start health checks.
4. Send ``_send_status READY`` and enter the event loop.
Anything that fails before READY is logged and exits 1: the master then fails
the reload (or the start) and keeps the old workers.
"""

from __future__ import annotations

import asyncio
import grp
import json
import logging
import os
import pwd
import socket
import sys
from dataclasses import dataclass
from typing import Any

from hapymaster.config import Config, ConfigError, parse_config
from hapymaster.pdeathsig import die_with_reaper, libc_function
from hapymaster.sdnotify import setup_logging
# Everything the worker will ever import is imported here, before privileges
# are dropped: afterwards the interpreter's own library may not be readable
# (a Python under /root, a chroot), and a lazy import would fail mid-request.
from hapymaster.worker.accesslog import AccessLog, open_sink
from hapymaster.worker.proxy_http import http_client_factory
from hapymaster.worker.proxy_tcp import tcp_client_factory
from hapymaster.worker.stats import StatsHttp
from hapymaster.worker.checks import HealthChecker
from hapymaster.worker.control import ControlChannel
from hapymaster.worker.process import Worker
from hapymaster.worker.runtime import apply_state

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency
    uvloop = None

log = logging.getLogger("hapymaster.worker")


def read_boot(sock: socket.socket) -> tuple[dict[str, Any], bytes]:
    """The first line from the master, and whatever came after it."""
    data = b""
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise RuntimeError("the control channel closed before the boot message")
        data += chunk
    line, _, rest = data.partition(b"\n")
    message = json.loads(line)
    if not isinstance(message, dict) or message.get("type") != "boot":
        raise RuntimeError(f"expected a boot message, got {line[:80]!r}")
    return message, rest


def drop_privileges(config: Config) -> None:
    """As root with global.user/group set: become that user (listeners are already bound)."""
    user, group = config.global_.user, config.global_.group
    if os.getuid() != 0 or not (user or group):
        return
    uid = gid = None
    if user:
        entry = pwd.getpwnam(user)
        uid, gid = entry.pw_uid, entry.pw_gid
    if group:
        gid = grp.getgrnam(group).gr_gid
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    log.info("running as uid %d gid %d", os.getuid(), os.getgid())


def keep_freed_memory() -> None:
    """Let glibc keep and reuse the worker's large freed blocks.

    Every read hands Python a new bytes object of up to 256 KiB (uvloop's
    read buffer). By default glibc serves blocks that size from the top of
    the heap and gives them back to the kernel as soon as they are freed,
    so bulk transfers spent about a tenth of the worker's CPU in brk, page
    faults and zeroing fresh pages (perf, http-upload-1m). A few MiB kept
    mapped is the better trade for a proxy.
    """
    try:
        mallopt = libc_function("mallopt")
    except (OSError, AttributeError):
        return      # not glibc: nothing to tune
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 4 << 20)     # blocks up to 4 MiB come from the heap
    mallopt(m_trim_threshold, 32 << 20)    # give memory back only beyond 32 MiB free


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


def main() -> int:
    """``python -m hapymaster.worker``: the control fd comes in HAPYMASTER_CONTROL_FD."""
    fd_text = os.environ.get("HAPYMASTER_CONTROL_FD", "")
    if not fd_text.isdigit():
        setup_logging("worker")
        log.error("HAPYMASTER_CONTROL_FD is not set: a worker is started by the master")
        return 2
    return run(int(fd_text))


@dataclass(frozen=True)
class Preforked:
    """What a worker forked by the template knows at birth (hapymaster.forkserver):
    the config, parsed once by the template for the whole generation, and who it is."""
    config: Config
    generation: int
    index: int
    master_pid: int


def run(control_fd: int, fd_map: dict[int, int] | None = None,
        preforked: Preforked | None = None) -> int:
    """The worker's life, from the boot message to its exit code.

    ``fd_map`` maps the master's listener fd numbers (those the boot message
    names) to this process's: a forked worker received them by SCM_RIGHTS,
    under other numbers. None: inherited across exec, same numbers.
    ``preforked``: forked by the template, which parsed the config; the
    worker then builds everything before it reads the boot message, which
    the master sends once it has the runtime state to carry over (from a
    worker of the previous generation): the two overlap.
    """
    control_sock = socket.socket(fileno=control_fd)
    control_sock.setblocking(True)
    boot: dict[str, Any] | None = None
    leftover = b""
    if preforked is None:
        setup_logging("worker")
        try:
            boot, leftover = read_boot(control_sock)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot read the boot message: %s", exc)
            return 1
        generation = int(boot.get("generation") or 0)
        index, master_pid = int(boot.get("index") or 1), int(boot.get("master_pid") or 0)
        setup_logging("worker", generation)
        try:
            config = parse_config(str(boot.get("config_text", "")),
                                  str(boot.get("config_path", "")))
        except ConfigError as exc:
            for error in exc.errors:
                log.error("%s", error)
            return 1
    else:
        config, generation = preforked.config, preforked.generation
        index, master_pid = preforked.index, preforked.master_pid
        setup_logging("worker", generation)
    try:
        # Before dropping privileges: a log file may be writable by root only.
        access_sink = open_sink(config.global_.access_log, generation)
    except OSError as exc:
        log.error("cannot open the access log: %s", exc)
        return 1
    try:
        drop_privileges(config)
    except (KeyError, OSError) as exc:
        log.error("cannot drop privileges to user %r group %r: %s", config.global_.user,
                  config.global_.group, exc)
        return 1

    if preforked is None:
        keep_freed_memory()     # a forked worker has the template's malloc settings
    loop = new_loop()
    asyncio.set_event_loop(loop)
    worker = Worker(config, loop, generation, index, master_pid, AccessLog(loop, access_sink))
    if boot is None:
        try:
            boot, leftover = read_boot(control_sock)
        except (OSError, ValueError, RuntimeError) as exc:
            log.error("cannot read the boot message: %s", exc)
            return 1
    if master_pid:
        # Armed (again) here, after dropping privileges: the kernel forgets it
        # when the uid or gid changes. And only once the master adopted us: a
        # forked worker's parent is the template's intermediate process,
        # which exits after forking the last worker of the generation. By
        # the time the boot message came (the master sends it once it knows
        # the pids) that exit is done or under way; waiting for the adoption
        # any earlier cost the first worker ~5-8 ms, while its siblings were
        # forked. Until now a master that died closed the control socket: EOF above.
        die_with_reaper(master_pid)
    try:
        apply_state(worker, boot.get("state"))
        listeners = list(boot.get("listeners") or [])
        if fd_map is not None:
            listeners = [{**entry, "fd": fd_map[entry["fd"]]} for entry in listeners]
        loop.run_until_complete(worker.open_listeners(
            listeners, {"http": http_client_factory, "tcp": tcp_client_factory}, StatsHttp))
        control_sock.setblocking(False)
        _, control = loop.run_until_complete(loop.create_unix_connection(
            lambda: ControlChannel(worker, leftover), sock=control_sock))
        worker.control = control
        worker.checks = HealthChecker(worker)
        worker.checks.start()
        worker.install_signals()
        worker.start_sweeper()
    except Exception as exc:  # noqa: BLE001 - any failure before READY fails the reload
        log.error("worker cannot start: %s", exc, exc_info=not isinstance(exc, (OSError,
                                                                                RuntimeError)))
        return 1
    # READY just before the loop runs: from here on the worker serves.
    control.send_line("_send_status READY")
    log.info("ready: %d frontend(s), %d backend(s)", len(worker.frontends), len(worker.backends))
    code = loop.run_until_complete(worker.exit_future)
    log.info("exiting")
    try:
        loop.run_until_complete(asyncio.sleep(0))
    finally:
        worker.access_log.close()
        loop.close()
    return int(code or 0)


if __name__ == "__main__":
    if os.environ.get("HAPYMASTER_PROFILE"):
        import cProfile
        profile = cProfile.Profile()
        code = profile.runcall(main)
        profile.dump_stats(os.environ["HAPYMASTER_PROFILE"])
        sys.exit(code)
    sys.exit(main())
