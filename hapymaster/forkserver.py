"""The worker template ("fork server"): workers are forked, not started afresh.

A fresh ``python -m hapymaster.worker`` pays for an interpreter and every
import at each reload (~200 ms on an idle core, 600-700 ms under load). The
master instead keeps ONE template process (``python -m hapymaster.forkserver``)
that imported the worker code once and froze it (``gc.freeze()``, so forked
workers share those pages copy-on-write); a spawn request is one message on
a SOCK_SEQPACKET socketpair carrying the worker's fds (its end of the control
socketpair, the listeners) by SCM_RIGHTS, and the answer is the new pid.

The master stays every worker's parent and reaper (SIGCHLD, exit statuses):
it is a child subreaper, and the template double-forks: its direct child
forks the worker and exits at once, so the kernel hands the worker to the
master. The worker arms PDEATHSIG only once it is the master's child: one
armed earlier would fire when that intermediate process exits.

After a package upgrade a reload must run the new code: at each reload the
master compares a cheap signature of the code on disk (a digest of the
package's .py files, the installed version, the interpreter) with the one
taken when the template was started, and replaces a stale template first.

This module is both sides: ``ForkServer`` (used by the master, imports only
the standard library) and ``serve`` (the template, which imports the worker).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import traceback
from typing import Any

from . import __version__
from .pdeathsig import die_with_parent, die_with_reaper, set_process_name
from .sdnotify import child_environment, setup_logging

log = logging.getLogger("hapymaster.master")

FD_ENV = "HAPYMASTER_FORKSERVER_FD"
# A spawn is two forks in a process that does nothing else: milliseconds. A
# template that takes longer is hung, and the master must not wait on it.
SPAWN_TIMEOUT = 5.0
# How long a forked worker waits to be handed to the master (the intermediate
# process exits right after forking it: normally well under a millisecond).
REPARENT_TIMEOUT = 2.0
# The kernel's SCM_MAX_FD: the most fds one message may carry.
MAX_FDS = 253
MAX_MESSAGE = 65536
# What `ps -o comm`, top and the journal's _COMM show for the template; its
# command line is the same as its workers' (they are forks of it).
TEMPLATE_NAME = b"hapymaster-tmpl"


class ForkServerError(Exception):
    """The template could not be started or could not fork a worker."""


def _package_dir() -> str:
    """Where a fresh interpreter would import hapymaster from now.

    Not this process's ``hapymaster.__file__``: an upgrade may install the
    package somewhere else. The meta path finders are asked directly
    (``importlib.util.find_spec`` would answer from sys.modules).
    """
    importlib.invalidate_caches()
    for finder in sys.meta_path:
        find_spec = getattr(finder, "find_spec", None)
        spec = find_spec("hapymaster", None) if find_spec is not None else None
        if spec is not None and spec.submodule_search_locations:
            return list(spec.submodule_search_locations)[0]
    return os.path.dirname(os.path.abspath(__file__))


def installed_version() -> str:
    """The version on disk now: after a package upgrade, new workers run it."""
    # Imported here, not at the top: the worker template imports this
    # module, and what the template imports is in every worker's memory
    # (importlib.metadata brings zipfile, email, csv...: ~1.3 MiB of RSS per
    # worker). Only the master calls this.
    import importlib.metadata
    try:
        return importlib.metadata.version("hapymaster")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def code_signature() -> tuple[str, ...]:
    """What the template's code was imported from: changes when an upgrade touched it.

    A digest of the package's .py files' contents (well under a millisecond:
    ~300 KB from the page cache), not their sizes and mtimes: dpkg gives
    files the mtime stored in the .deb, which reproducible builds clamp to
    the changelog date. The interpreter is in it too (a Python update also
    replaces the template), and the installed version.
    """
    import hashlib  # the master's only (see installed_version): ~0.7 MiB in every worker
    digest = hashlib.blake2b(digest_size=16)
    top = _package_dir()
    for directory, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                try:
                    with open(path, "rb") as source:
                        content = source.read()
                except OSError:
                    continue
                digest.update(f"{os.path.relpath(path, top)}\0{len(content)}\0".encode())
                digest.update(content)
    try:
        st = os.stat(os.path.realpath(sys.executable))
        interpreter = f"{sys.executable}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        interpreter = sys.executable
    return (installed_version(), interpreter, top, digest.hexdigest())


class ForkServer:
    """The master's handle on its worker template: start, replace, spawn, close."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.signature: tuple[str, ...] | None = None
        # A reload's refresh and a worker restart may both find the template
        # gone: one of them starts the next, the other waits for it.
        self._starting = asyncio.Lock()

    def running(self) -> bool:
        """True if the template is up. It never speaks unasked: anything to read is EOF."""
        if self.sock is None:
            return False
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable

    async def ensure(self, timeout: float) -> None:
        """Start the template unless it runs (first use, or it died)."""
        async with self._starting:
            if self.running():
                return
            if self.sock is not None:
                log.warning("the worker template (pid %s) is gone: starting a new one", self.pid)
                self.close()
            await self._start(timeout)

    async def refresh(self, timeout: float) -> None:
        """At a reload: replace the template if the code on disk changed since it started."""
        async with self._starting:
            if self.running() and self.signature == code_signature():
                return
            if self.running():
                log.info("the code on disk changed: replacing the worker template (pid %s)",
                         self.pid)
            self.close()
            await self._start(timeout)

    async def _start(self, timeout: float) -> None:
        signature = code_signature()  # before the template imports: never newer than its code
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = child_environment()
        env[FD_ENV] = str(theirs.fileno())
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "hapymaster.forkserver"], env=env,
                stdin=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                preexec_fn=functools.partial(die_with_parent, os.getpid()))
        except OSError as exc:
            ours.close()
            raise ForkServerError(f"cannot start the worker template: {exc}") from None
        finally:
            theirs.close()
        # The master reaps every child itself (SIGCHLD): Popen must never wait.
        process.returncode = 0
        self.pid = process.pid
        ours.setblocking(False)
        try:
            hello = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(ours, MAX_MESSAGE),
                                           timeout)
        except asyncio.TimeoutError:
            ours.close()
            os.kill(process.pid, signal.SIGKILL)  # not reaped yet: it never answered
            raise ForkServerError(f"the worker template (pid {process.pid}) was not ready "
                                  f"within {timeout:g}s") from None
        except OSError as exc:
            hello = b""
            log.error("reading from the worker template: %s", exc)
        message = json.loads(hello) if hello else {}
        if not message.get("ready"):
            ours.close()
            why = message.get("error") or "it exited at once (its log says why)"
            raise ForkServerError(f"the worker template cannot start: {why}")
        self.sock, self.signature = ours, signature
        log.info("worker template started (pid %d)", process.pid)

    def spawn(self, control: socket.socket, listener_fds: list[int], master_pid: int) -> int:
        """Fork a worker with these fds; return its pid (the worker is, or soon is, our child).

        Blocking, bounded by SPAWN_TIMEOUT: the pid is known before the
        master's loop runs again, so a worker that exits at once is never an
        unknown child at SIGCHLD.
        """
        if self.sock is None:
            raise ForkServerError("the worker template is not running")
        if len(listener_fds) + 1 > MAX_FDS:
            raise ForkServerError(f"too many listeners for one spawn: {len(listener_fds)}")
        request = {"master_pid": master_pid, "listener_fds": listener_fds}
        sock = self.sock
        try:
            sock.settimeout(SPAWN_TIMEOUT)
            socket.send_fds(sock, [json.dumps(request).encode()],
                            [control.fileno(), *listener_fds])
            answer = sock.recv(MAX_MESSAGE)
        except socket.timeout:
            self.close()
            if self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)  # hung, so not reaped yet
            raise ForkServerError(f"the worker template (pid {self.pid}) did not answer a "
                                  f"spawn within {SPAWN_TIMEOUT:g}s") from None
        except OSError as exc:
            self.close()
            raise ForkServerError(f"the worker template did not answer a spawn: {exc}") from None
        finally:
            if self.sock is not None:
                sock.setblocking(False)
        if not answer:
            self.close()
            raise ForkServerError("the worker template exited during a spawn")
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = {"error": f"a malformed answer {answer[:80]!r}"}
        if "pid" not in reply:
            raise ForkServerError(f"the worker template cannot fork a worker: {reply.get('error')}")
        return int(reply["pid"])

    def close(self) -> None:
        """The template exits when its socket closes (the master reaps it)."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None


# --- the template process ----------------------------------------------------

def serve(fd: int) -> int:
    """The template: import the worker once, then fork one worker per request."""
    sock = socket.socket(fileno=fd)
    setup_logging("worker")
    with open("/proc/self/comm", "rb") as comm:
        worker_name = comm.read().strip()
    set_process_name(TEMPLATE_NAME)
    # Ctrl-C reaches the whole foreground process group; the master decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # Everything the worker imports, here, before any fork: that is the point.
        from hapymaster.worker import __main__ as worker_main
        from hapymaster.config import EMBEDDED_CONFIG, parse_config
    except BaseException as exc:  # noqa: BLE001 - a broken upgrade must say what broke
        traceback.print_exc()
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError):   # one line, file:line first, as config errors are
            why = f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
        sock.send(json.dumps({"error": why}).encode())
        return 1
    # One parse here runs what the config parser sets up on first use, once
    # for all workers (measured: -0.7 ms CPU of the ~4.5 ms a forked worker
    # spends parsing a small config).
    parse_config(EMBEDDED_CONFIG, "<warm-up>")
    # Everything imported so far is shared with the workers, copy-on-write:
    # freezing it keeps the collector from touching (and so copying) those pages.
    gc.collect()
    gc.freeze()
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            return 1
        if not data:
            return 0   # the master closed its end: it is stopping or replaced us
        try:
            request = json.loads(data)
            reply: dict[str, Any] = {"pid": _fork_worker(sock, fds, request, worker_main.run,
                                                         worker_name)}
        except (OSError, ValueError) as exc:
            reply = {"error": str(exc)}
        finally:
            for received in fds:
                os.close(received)
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            return 1   # the master is gone



def _fork_worker(sock: socket.socket, fds: list[int], request: dict[str, Any],
                 run: Any, name: bytes) -> int:
    """Double fork: the worker's parent exits at once, so the master adopts it."""
    if not fds:
        raise ValueError("a spawn request without the control fd")
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            # Before the worker exists: it is never the master's child under our name.
            set_process_name(name)   # the interpreter's, as a `python -m` worker has
            # Read by `python -m hapymaster.worker`; set here so a worker
            # looks the same both ways (the tests' fault hooks look for it).
            os.environ["HAPYMASTER_CONTROL_FD"] = str(fds[0])
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                _worker_child(sock, fds, request, run)
            os.write(write_end, b"%d" % worker)
        except OSError as exc:
            os.write(write_end, f"-{exc}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        answer = os.read(read_end, 512).decode()
    finally:
        os.close(read_end)
        os.waitpid(middle, 0)
    if not answer or answer.startswith("-"):
        raise OSError(f"cannot fork a worker: {answer[1:] or 'the intermediate process died'}")
    return int(answer)


def _worker_child(sock: socket.socket, fds: list[int], request: dict[str, Any],
                  run: Any) -> None:
    """The forked worker: undo what is the template's, then the worker's own main."""
    code: Any = 1
    try:
        sock.close()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # `random` reseeds itself after fork (os.register_at_fork); no event
        # loop exists in the template, so run() makes a fresh one.
        master_pid = int(request["master_pid"])
        die_with_reaper(master_pid, REPARENT_TIMEOUT)
        fd_map = dict(zip(request.get("listener_fds") or [], fds[1:]))
        if os.environ.get("HAPYMASTER_PROFILE"):
            import cProfile
            profile = cProfile.Profile()
            code = profile.runcall(run, fds[0], fd_map)
            profile.dump_stats(os.environ["HAPYMASTER_PROFILE"])
        else:
            code = run(fds[0], fd_map)
    except SystemExit as exc:
        code = exc.code
    except BaseException:  # noqa: BLE001 - never fall back into the template's loop
        traceback.print_exc()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code if isinstance(code, int) else 1)


if __name__ == "__main__":
    fd_text = os.environ.pop(FD_ENV, "")
    if not fd_text.isdigit():
        print(f"{FD_ENV} is not set: the worker template is started by the master",
              file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(int(fd_text)))
