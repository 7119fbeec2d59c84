"""Command line: run the master, check a config, reload, talk to the master CLI.

``hapymaster reload`` is what systemd's ExecReload= runs at every reload, and
``ctl`` is run by scripts: both import only what sending one line to a unix
socket needs. The master, the config parser and PyYAML (~150 ms of imports)
are imported inside the functions that use them; ``reload`` with the usual
arguments does not even import argparse (see ``quick_reload_args``).
"""

from __future__ import annotations

import os
import sys

from . import __version__

TYPE_CHECKING = False  # not `from typing import`: typing alone costs ~3 ms here
if TYPE_CHECKING:
    import argparse
    import subprocess

    from . import reexec
    from .master import Master

USAGE = """\
hapymaster -f CONFIG [-S SOCKET] [-D]     run the master (foreground unless -D)
hapymaster -c -f CONFIG                   check the config
hapymaster reload [-S SOCKET] [--hard] [--upgrade]
                                          reload, wait until the new workers are READY or failed
                                          (--upgrade: re-execute the master in place first)
hapymaster ctl [-S SOCKET] COMMAND...     send one master CLI command, print the answer
hapymaster --version"""


def command() -> None:
    """The ``hapymaster`` command: the console script, packaging/bin/hapymaster
    (the Debian package's), ``python -m hapymaster``.

    ``reload`` and ``ctl`` end with ``os._exit`` once their output is
    flushed: they hold nothing to clean up, and the interpreter's
    finalization (module teardown, a last collection) was ~2-6 ms of the
    ~45 ms that `systemctl reload` waits for here. The master exits the
    usual way (atexit: logging's last flush).
    """
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in ("reload", "ctl"):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "reload":
        return reload_command(argv[1:])
    if argv and argv[0] == "ctl":
        return ctl_command(argv[1:])
    import argparse

    from .config import DEFAULT_CONFIG_PATH
    parser = argparse.ArgumentParser(prog="hapymaster", usage=USAGE)
    parser.add_argument("-f", dest="config", help=f"config file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("-S", dest="socket", help="master CLI socket")
    parser.add_argument("-c", dest="check", action="store_true", help="check the config and exit")
    parser.add_argument("-D", dest="daemon", action="store_true",
                        help="daemonize (only for use without systemd)")
    parser.add_argument("--version", action="version", version=f"hapymaster {__version__}")
    args = parser.parse_args(argv)
    if args.check:
        return check_command(args.config or DEFAULT_CONFIG_PATH)
    return run_master(args)


def check_command(path: str) -> int:
    from .config import ConfigError
    from .master import load_function
    try:
        load_function(path, "", "")()
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    print("Configuration file is valid")
    return 0


def run_master(args: argparse.Namespace) -> int:
    import tempfile

    from .config import (DEFAULT_CONFIG_PATH, DEFAULT_MASTER_SOCKET, EMBEDDED_CONFIG,
                         EMBEDDED_NAME, ConfigError)
    from .master import Master, load_function
    from .reexec import CarryError, take_state
    from .sdnotify import setup_logging
    try:
        carried = take_state()
    except CarryError as exc:
        print(f"hapymaster: cannot take over after a re-exec: {exc}", file=sys.stderr)
        return 1
    if carried is not None:
        return resume_master(args, carried)
    embedded = args.config is None and not os.path.exists(DEFAULT_CONFIG_PATH)
    config_path = None if embedded else (args.config or DEFAULT_CONFIG_PATH)
    load = load_function(config_path, EMBEDDED_CONFIG, EMBEDDED_NAME)
    try:
        config, text = load()
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    scratch = tempfile.mkdtemp(prefix="hapymaster-") if embedded else None
    socket_path = (args.socket or config.global_.master_socket
                   or (os.path.join(scratch, "master.sock") if scratch else DEFAULT_MASTER_SOCKET))
    if args.daemon:
        daemonize()
    setup_logging("master", journal=True if args.daemon else None)
    if embedded:
        print(f"hapymaster: no {DEFAULT_CONFIG_PATH}, running the embedded demo config.\n"
              f"  try:   curl http://127.0.0.1:8080/   (twice: round robin over two demo origins)\n"
              f"  stats: http://127.0.0.1:8404/  (CSV: /;csv, Prometheus: /metrics)\n"
              f"  CLI:   hapymaster ctl -S {socket_path} show proc", file=sys.stderr, flush=True)
    master = Master(config, text, config_path, socket_path, load)
    demo = start_demo_origins().pid if embedded else None
    return serve_master(master, demo, scratch)


def resume_master(args: argparse.Namespace, carried: reexec.Carried) -> int:
    """The master's new image after a re-exec in place: same pid, carried state."""
    from .config import EMBEDDED_CONFIG, EMBEDDED_NAME, ConfigError, parse_config
    from .master import Master, load_function
    from .sdnotify import setup_logging
    setup_logging("master", journal=True if args.daemon else None)
    try:
        # What the running workers run; checked by this code before the execve.
        config = parse_config(carried.config_text, carried.config_source)
    except ConfigError as exc:
        for error in exc.errors:
            print(error, file=sys.stderr)
        return 1
    load = load_function(carried.config_path, EMBEDDED_CONFIG, EMBEDDED_NAME)
    master = Master(config, carried.config_text, carried.config_path, carried.socket_path, load)
    master.adopt(carried)
    return serve_master(master, carried.demo_pid, carried.scratch)


def serve_master(master: Master, demo_pid: int | None, scratch: str | None) -> int:
    """Run the master until it stops; what it started for the embedded config goes with it."""
    import asyncio
    import shutil

    from . import mcli
    if demo_pid is not None:
        master.carry_extra["demo_pid"] = demo_pid
        master.on_stop.append(lambda: stop_child(demo_pid))
    if scratch:
        master.carry_extra["scratch"] = scratch
        master.on_stop.append(lambda: shutil.rmtree(scratch, ignore_errors=True))
    try:
        return asyncio.run(_run(master, mcli.serve))
    finally:
        master.close()


async def _run(master: Master, serve) -> int:  # type: ignore[no-untyped-def]
    try:
        return await master.run(serve)
    except OSError as exc:
        print(f"hapymaster: {exc}", file=sys.stderr)
        return 1


def start_demo_origins() -> subprocess.Popen[bytes]:
    import functools
    import subprocess

    from .pdeathsig import die_with_parent
    from .sdnotify import child_environment
    process = subprocess.Popen([sys.executable, "-m", "hapymaster.demo"], env=child_environment(),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               preexec_fn=functools.partial(die_with_parent, os.getpid()))
    assert process.stdout is not None
    process.stdout.readline()  # "demo origins ready": the first health check should pass
    # The master reaps every child itself (SIGCHLD), this one too: Popen must never wait.
    process.returncode = 0
    return process


def stop_child(pid: int) -> None:
    import signal
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


def daemonize() -> None:
    """Classic double fork, for use without systemd only (systemd wants -D off)."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)


def socket_from_config(path: str) -> str:
    """The master socket a config names, read leniently: reloading to fix a
    config that has errors must still reach the master."""
    import yaml

    from .config import DEFAULT_MASTER_SOCKET
    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
        value = doc.get("global", {}).get("master_socket")
        if isinstance(value, str) and value:
            return value
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return DEFAULT_MASTER_SOCKET


def _client_parser(prog: str) -> argparse.ArgumentParser:
    import argparse
    parser = argparse.ArgumentParser(prog=f"hapymaster {prog}")
    parser.add_argument("-S", dest="socket", help="master CLI socket")
    parser.add_argument("-f", dest="config",
                        help="config whose global.master_socket to use when -S is not given "
                             "(default /etc/hapymaster/hapymaster.yaml)")
    return parser


def _master_socket(socket_path: str | None, config: str | None) -> str:
    if socket_path:
        return socket_path
    from .config import DEFAULT_CONFIG_PATH
    return socket_from_config(config or DEFAULT_CONFIG_PATH)


def quick_reload_args(argv: list[str]) -> tuple[str | None, str | None, bool, bool] | None:
    """``reload``'s arguments as systemd and scripts pass them, read without argparse.

    Importing argparse is ~10 ms of the ~35 ms the whole command took at
    every reload (the new workers are READY in less). Only the plain forms
    are read here: ``-S PATH``, ``-f PATH``, ``--hard``, ``--upgrade``;
    anything else (``--help``, ``-SPATH``, a mistake) returns None, for
    argparse to answer exactly as it always did. Returns (socket, config,
    hard, upgrade).
    """
    found: dict[str, str | None] = {"-S": None, "-f": None}
    flags = {"--hard": False, "--upgrade": False}
    words = iter(argv)
    for word in words:
        if word in flags:
            flags[word] = True
        elif word in found:
            value = next(words, None)
            if value is None or value.startswith("-"):
                return None
            found[word] = value
        else:
            return None
    return found["-S"], found["-f"], flags["--hard"], flags["--upgrade"]


def _send(socket_path: str, command: str) -> str | None:
    from .mclient import client
    try:
        return client(socket_path, command)
    except OSError as exc:
        print(f"hapymaster: cannot reach the master at {socket_path}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return None


def reload_command(argv: list[str]) -> int:
    quick = quick_reload_args(argv)
    if quick is not None:
        socket_path, config, hard, upgrade = quick
    else:
        parser = _client_parser("reload")
        parser.add_argument("--hard", action="store_true",
                            help="terminate the previous workers instead of letting them finish")
        parser.add_argument("--upgrade", action="store_true",
                            help="re-execute the master in place first (same pid, sockets and "
                                 "workers), so it runs the code installed now")
        args = parser.parse_args(argv)
        socket_path, config, hard, upgrade = args.socket, args.config, args.hard, args.upgrade
    command = "upgrade" if upgrade else "reload"
    answer = _send(_master_socket(socket_path, config), f"hard-{command}" if hard else command)
    if answer is None:
        return 1
    success = answer.startswith("Success=1")
    print(answer, end="", file=sys.stdout if success else sys.stderr)
    return 0 if success else 1


def ctl_command(argv: list[str]) -> int:
    parser = _client_parser("ctl")
    parser.add_argument("command", nargs="+", help="e.g. show proc, or @1 show info")
    args = parser.parse_args(argv)
    answer = _send(_master_socket(args.socket, args.config), " ".join(args.command))
    if answer is None:
        return 1
    print(answer, end="")
    return 0
