"""The worker template ("fork server"): workers are forked, not started afresh.

A fresh ``python -m hapymaster.worker`` pays for an interpreter and every
import at each reload (~200 ms on an idle core, 600-700 ms under load). The
master instead keeps ONE template process (``python -m hapymaster.forkserver``)
that imported the worker code once and froze it (``gc.freeze()``, so forked
workers share those pages copy-on-write). A spawn request is one message on
a SOCK_SEQPACKET socketpair for a whole generation: the config text (in a
memfd) and each worker's end of its control socketpair and the listeners, by
SCM_RIGHTS; the template parses the config once, the workers inherit it, and
the answer is their pids.

The master stays every worker's parent and reaper (SIGCHLD, exit statuses):
it is a child subreaper, and the template double-forks: its direct child
forks the workers and exits at once, so the kernel hands them to the
master. A worker arms PDEATHSIG only once it is the master's child: one
armed earlier would fire when that intermediate process exits.

After a package upgrade a reload must run the new code: at each reload the
master compares a signature of the code on disk (a digest of the package's
.py files, the installed version, the interpreter; recomputed only when a
file's stat changed, ``CodeOnDisk``) with the one taken when the template
was started, and replaces a stale template first.

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
import time
import traceback
# The template unpickles the master's config with pickle's C half: pickle.py
# itself (its Python pickler, only the master pickles) was 0.2 MiB of every
# worker's idle RSS (bench/worker_rss.py, issue 9). Loaded here, before any fork.
import _pickle
from dataclasses import dataclass
from typing import Any, NoReturn

from . import __version__
from .pdeathsig import die_with_parent, die_with_reaper, set_process_name
from .sdnotify import child_environment, setup_logging

log = logging.getLogger("hapymaster.master")

FD_ENV = "HAPYMASTER_FORKSERVER_FD"
# Set (to "1") when the template will be sent config text, not the master's
# pickle: it runs other code than the master (see ForkServer.spawn).
PARSES_ENV = "HAPYMASTER_FORKSERVER_PARSES"
# A spawn is two forks in a process that does nothing else: milliseconds. A
# template that takes longer is hung, and the master must not wait on it.
SPAWN_TIMEOUT = 5.0
# The kernel's SCM_MAX_FD: the most fds one message may carry.
MAX_FDS = 253
MAX_MESSAGE = 65536
# What `ps -o comm`, top and the journal's _COMM show for the template; its
# command line is the same as its workers' (they are forks of it).
TEMPLATE_NAME = b"hapymaster-tmpl"
# And for its spare intermediate process, until that forks workers.
SPARE_NAME = b"hapymaster-fork"


class ForkServerError(Exception):
    """The template could not be started or could not fork a worker."""


class TemplateGone(ForkServerError):
    """The template died (killed, OOM) before it could answer: another may be started."""


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
    # Imported here, as hashlib below: the master's needs, not the template's,
    # whose every page each fork copies (with email, zipfile, csv... 1.8 MiB).
    import importlib.metadata
    try:
        return importlib.metadata.version("hapymaster")
    except importlib.metadata.PackageNotFoundError:
        return __version__


def _source_files(top: str) -> list[str]:
    """The package's .py files, in a stable order."""
    found = []
    for directory, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if d != "__pycache__")
        found += [os.path.join(directory, name) for name in sorted(names) if name.endswith(".py")]
    return found


def _interpreter() -> str:
    try:
        st = os.stat(os.path.realpath(sys.executable))
    except OSError:
        return sys.executable
    return f"{sys.executable}:{st.st_size}:{st.st_mtime_ns}"


def code_signature(top: str | None = None, files: list[str] | None = None) -> tuple[str, ...]:
    """What the template's code was imported from: changes when an upgrade touched it.

    A digest of the package's .py files' contents (~300 KB from the page
    cache, a few ms), not their sizes and mtimes: dpkg gives files the mtime
    stored in the .deb, which reproducible builds clamp to the changelog
    date. The interpreter is in it too (a Python update also replaces the
    template), and the installed version. ``CodeOnDisk`` avoids recomputing
    it at every reload.
    """
    import hashlib
    top = top or _package_dir()
    digest = hashlib.blake2b(digest_size=16)
    for path in _source_files(top) if files is None else files:
        try:
            with open(path, "rb") as source:
                content = source.read()
        except OSError:
            continue
        digest.update(f"{os.path.relpath(path, top)}\0{len(content)}\0".encode())
        digest.update(content)
    return (installed_version(), _interpreter(), top, digest.hexdigest())


def _stat_of(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class CodeOnDisk:
    """``code_signature()`` and the installed version, looked up again only when
    a stat says they may have changed.

    Finding the package (the import system's finders list every directory of
    sys.path), reading the installed version from its metadata (another scan,
    and an email parser over METADATA) and hashing every source file cost
    ~6-8 ms of the master's time at each reload, in its critical path; the
    stats that stand for them cost ~0.1 ms. The key is the status of every
    sys.path directory (installing, upgrading or removing a package adds or
    removes an entry there: the package's directory, its ``*.dist-info``
    named after the version), of every directory of the package, and of
    each of its source files: inode, size, mtime and *ctime*. dpkg chooses
    the mtime, but the kernel sets the ctime whenever a file is written,
    renamed or created (an upgrade unpacks every file anew), and nobody can
    set it back. The interpreter is in the key too.

    Git's "racy clean" problem applies: the ctime has the kernel's coarse
    granularity (a few ms), so a file written again within that tick after
    it was looked at would keep its key. A key with a ctime younger than
    RACY_NS is therefore never kept: the next lookup starts afresh.
    """

    RACY_NS = 2_000_000_000

    def __init__(self) -> None:
        # (sys.path, the paths whose stats are the key, those stats, the signature)
        self._known: tuple[list[str], list[str], list[tuple[int, ...] | None],
                           tuple[str, ...]] | None = None

    def signature(self) -> tuple[str, ...]:
        """(installed version, interpreter, package directory, digest of the sources)."""
        if self._known is not None:
            search, paths, stats, signature = self._known
            if search == sys.path and [_stat_of(path) for path in paths] == stats:
                return signature
        search = list(sys.path)
        top = _package_dir()
        files = _source_files(top)
        directories = sorted({os.path.dirname(path) for path in files} | {top})
        # A sys.path directory that does not exist yet is in the key as None.
        paths = [entry for entry in search if entry]
        paths += [os.path.realpath(sys.executable), *directories, *files]
        stats = [_stat_of(path) for path in paths]
        signature = code_signature(top, files)
        now = time.time_ns()
        if all(now - st[4] > self.RACY_NS for st in stats if st is not None):
            self._known = (search, paths, stats, signature)
        else:
            self._known = None
        return signature

    def installed_version(self) -> str:
        """The version on disk now (``installed_version()``, from the same cache)."""
        return self.signature()[0]


class ForkServer:
    """The master's handle on its worker template: start, replace, spawn, close."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.pid: int | None = None
        self.signature: tuple[str, ...] | None = None
        self.code = CodeOnDisk()
        # The code this master runs (as on disk when it started): a template
        # started from the same code can take the master's parsed config.
        self.image = self.code.signature()
        # A reload's refresh and a worker restart may both find the template
        # gone: one of them starts the next, the other waits for it.
        self._starting = asyncio.Lock()

    @property
    def version(self) -> str:
        """The installed version when the template started: what its workers run."""
        return self.signature[0] if self.signature else self.code.installed_version()

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
            if self.running() and self.signature == self.code.signature():
                return
            if self.running():
                log.info("the code on disk changed: replacing the worker template (pid %s)",
                         self.pid)
            elif self.sock is not None:
                log.warning("the worker template (pid %s) is gone: starting a new one", self.pid)
            self.close()
            await self._start(timeout)

    async def _start(self, timeout: float) -> None:
        signature = self.code.signature()  # before the template imports: never newer than its code
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = child_environment()
        env[FD_ENV] = str(theirs.fileno())
        if signature != self.image:
            env[PARSES_ENV] = "1"
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

    def spawn(self, controls: list[socket.socket], listener_fds: list[int], master_pid: int,
              generation: int, indexes: list[int], config: Any,
              config_text: str) -> list[int]:
        """Fork one worker per index, each with its control socket; return their pids.

        One request for all of them, with the config the master parsed
        (``config``, a ``hapymaster.config.Config``), pickled: its workers
        inherit it, nobody parses it again (a parse is 1-2.5 ms of the
        reload's path, an unpickling 0.05 ms). Only when the template runs
        other code than this master (its code changed on disk since the
        master started, before a re-exec) does it get the text, and parse
        it with its own parser. One intermediate process forks them all.
        The config goes in a memfd, whatever its size (a SOCK_SEQPACKET
        message must fit the socket buffer).

        Blocking, bounded by SPAWN_TIMEOUT: the pids are known before the
        master's loop runs again, so a worker that exits at once is never an
        unknown child at SIGCHLD. Raises TemplateGone if the template died
        (the caller may start another and ask again), ForkServerError if it
        could not fork, OSError if the master is out of resources.
        """
        if self.sock is None:
            raise TemplateGone("the worker template is not running")
        if len(listener_fds) + len(controls) + 1 > MAX_FDS:
            raise ForkServerError(f"too many listeners for one spawn: {len(listener_fds)}")
        import pickle       # the master's side only (see _pickle above)
        same_code = self.signature == self.image
        request = {"master_pid": master_pid, "listener_fds": listener_fds,
                   "generation": generation, "indexes": indexes, "config_path": config.source,
                   "config": "pickle" if same_code else "text"}
        config_fd = os.memfd_create("hapymaster-config", os.MFD_CLOEXEC)
        try:
            data = (pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL) if same_code
                    else config_text.encode())
            while data:
                data = data[os.write(config_fd, data):]
            answer = self._ask(request, [config_fd, *(c.fileno() for c in controls), *listener_fds])
        finally:
            os.close(config_fd)
        pids = answer.get("pids")
        if not isinstance(pids, list) or len(pids) != len(indexes):
            raise ForkServerError(f"the worker template cannot fork the workers: "
                                  f"{answer.get('error')}")
        return [int(pid) for pid in pids]

    def _ask(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """One request, one answer, blocking for at most SPAWN_TIMEOUT."""
        sock = self.sock
        assert sock is not None
        try:
            sock.settimeout(SPAWN_TIMEOUT)
            socket.send_fds(sock, [json.dumps(request).encode()], fds)
            answer = sock.recv(MAX_MESSAGE)
        except socket.timeout:
            self.close()
            if self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)  # hung, so not reaped yet
            raise ForkServerError(f"the worker template (pid {self.pid}) did not answer a "
                                  f"spawn within {SPAWN_TIMEOUT:g}s") from None
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise TemplateGone(f"the worker template exited: {exc}") from None
        finally:
            if self.sock is not None:
                sock.setblocking(False)
        if not answer:
            self.close()
            raise TemplateGone("the worker template exited during a spawn")
        try:
            reply = json.loads(answer)
        except ValueError:
            reply = {"error": f"a malformed answer {answer[:80]!r}"}
        return reply if isinstance(reply, dict) else {"error": f"a malformed answer {answer[:80]!r}"}

    def close(self) -> None:
        """The template exits when its socket closes (the master reaps it)."""
        if self.sock is not None:
            self.sock.close()
        self.sock = None


# --- the template process ----------------------------------------------------

def serve(fd: int, parses: bool = False) -> int:
    """The template: import the worker once, then fork the workers each request asks for.

    ``parses``: it will be sent config text to parse, not the master's pickle.
    """
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
        from hapymaster.config import EMBEDDED_CONFIG, ConfigError, parse_config
    except BaseException as exc:  # noqa: BLE001 - a broken upgrade must say what broke
        traceback.print_exc()
        why = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, SyntaxError):   # one line, file:line first, as config errors are
            why = f"{exc.filename}:{exc.lineno}: {type(exc).__name__}: {exc.msg}"
        sock.send(json.dumps({"error": why}).encode())
        return 1
    if parses:
        # One parse here imports PyYAML and runs what the config parser sets
        # up on first use, once for all workers, not in every intermediate
        # process (measured: -0.7 ms CPU of the ~4.5 ms a forked worker spent
        # parsing a small config). Only then: with the master's pickle no
        # worker parses, and PyYAML with that state was 0.4 MiB of each
        # one's idle RSS (bench/worker_rss.py, issue 9).
        parse_config(EMBEDDED_CONFIG, "<warm-up>")
    # glibc's malloc settings are the process's memory: every fork inherits
    # them; so does asyncio's event loop policy, made on first use.
    worker_main.keep_freed_memory()
    asyncio.get_event_loop_policy()
    # Everything imported so far is shared with the workers, copy-on-write:
    # freezing it keeps the collector from touching (and so copying) those pages.
    gc.collect()
    gc.freeze()
    sock.send(json.dumps({"ready": True, "pid": os.getpid()}).encode())
    code = _Code(worker_main, parse_config, ConfigError, worker_name)
    spare: _Spare | None = None
    while True:
        if spare is None:
            # The next intermediate process is forked ahead of the request,
            # once no request came for SPARE_DELAY (not while the workers
            # just forked boot: the fork would compete with them).
            readable, _, _ = select.select([sock], [], [], SPARE_DELAY)
            if not readable:
                spare = _Spare.start(sock, code)
                continue
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        except OSError:
            return 1
        if not data:
            return 0   # the master closed its end: it is stopping or replaced us
        reply: dict[str, Any]
        middle = None
        current, spare = spare, None
        try:
            request = json.loads(data)
            pids, middle = _spawn(data, request, fds, sock, code, current)
            # A master older than this template (after an upgrade the
            # postinst reloads the master still running the old code) asks
            # for one worker per request, which reads its config text itself.
            reply = {"pids": pids} if "indexes" in request else {"pid": pids[0]}
        except SpawnFailed as exc:
            reply = {"error": str(exc)}
        except OSError as exc:
            reply = {"error": f"cannot fork a worker: {exc}"}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"a bad spawn request: {exc}"}
        finally:
            for received in fds:
                os.close(received)
            if current is not None:
                current.discard()
        try:
            sock.send(json.dumps(reply).encode())
        except OSError:
            return 1   # the master is gone
        finally:
            if middle is not None:
                # Reaped after the answer: its exit (unmapping a copy of
                # this process, ~3 ms here) is off the reload's path.
                os.waitpid(middle, 0)


# After a spawn, how long the template waits for another request before it
# forks the intermediate process of the next one.
SPARE_DELAY = 0.05


@dataclass(frozen=True)
class _Code:
    """What the template imported for its workers (imported there, not here:
    the master imports this module too)."""
    worker_main: Any
    parse_config: Any
    config_error: type[Exception]
    name: bytes          # the interpreter's process name, which workers keep


class SpawnFailed(Exception):
    """No worker of the request runs (any that was forked is killed)."""


@dataclass
class _Spare:
    """The intermediate process of the next spawn, forked ahead of it.

    A spawn is a double fork: an intermediate process forks every worker and
    exits, so that the master, a child subreaper, adopts them. Forking that
    intermediate (a copy of this ~30 MiB process) took ~3 ms of each reload
    here; a spare one waits for its request on a socketpair instead, dies
    with the template (PDEATHSIG), and does not hold the master's socket
    (whose EOF tells the master the template is gone).
    """
    pid: int
    channel: socket.socket
    taken: bool = False

    @classmethod
    def start(cls, sock: socket.socket, code: _Code) -> "_Spare | None":
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        template = os.getpid()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None     # the spawn forks its intermediate itself
        if pid == 0:
            try:
                ours.close()
                sock.close()
                set_process_name(SPARE_NAME)
                die_with_parent(template)
                data, fds, _, _ = socket.recv_fds(theirs, MAX_MESSAGE, MAX_FDS)
                if data:
                    _middle(theirs.detach(), json.loads(data), fds, code)
            finally:
                os._exit(0)
        theirs.close()
        return cls(pid, ours)

    def take(self, data: bytes, fds: list[int]) -> int | None:
        """Hand it the request; returns the fd its answer comes on, None if it is gone.

        Taken, it is the request's intermediate process: the caller reaps it.
        """
        try:
            if os.waitpid(self.pid, os.WNOHANG)[0] == 0:
                socket.send_fds(self.channel, [data], fds)
                self.taken = True
                return self.channel.detach()
        except OSError:
            pass
        self.discard()
        return None

    def discard(self) -> None:
        """Let it go unused (it exits at the EOF) and reap it."""
        if self.taken:
            return
        self.taken = True
        self.channel.close()
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def _spawn(data: bytes, request: dict[str, Any], fds: list[int], sock: socket.socket,
           code: _Code, spare: _Spare | None) -> tuple[list[int], int]:
    """Fork the workers of one request, through the spare intermediate process
    if there is a live one, else a new one. Returns the workers' pids and the
    intermediate's, which the caller reaps once it has answered: the pids are
    sent while the intermediate may still be exiting (a worker waits for its
    adoption before READY). Raises SpawnFailed.
    """
    count = len(request["indexes"]) if "indexes" in request else 1
    answers = spare.take(data, fds) if spare is not None else None
    if answers is not None:
        middle = spare.pid
    else:
        answers, write_end = os.pipe()
        middle = os.fork()
        if middle == 0:
            os.close(answers)
            sock.close()
            _middle(write_end, request, fds, code)
        os.close(write_end)
    answer = b""
    try:
        # Not to EOF: until every pid (or an error) came. A worker holds the
        # write end from its fork until it closes it, which a worker stuck
        # in an at-fork hook never does.
        while answer.count(b"\n") < count and b"-" not in answer:
            chunk = os.read(answers, 4096)
            if not chunk:
                break
            answer += chunk
    except BaseException:
        os.waitpid(middle, 0)
        raise
    finally:
        os.close(answers)
    lines = answer.decode().splitlines()
    pids = [int(line) for line in lines if not line.startswith("-")]
    if len(pids) == count:
        return pids, middle
    # If one worker cannot be forked, none is: those forked are the master's
    # children once the intermediate is gone, unknown to it; it reaps them
    # as strangers.
    os.waitpid(middle, 0)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    error = next((line[1:] for line in lines if line.startswith("-")), "")
    raise SpawnFailed(error or "cannot fork a worker: the intermediate process died")


def _middle(out: int, request: dict[str, Any], fds: list[int], code: _Code) -> NoReturn:
    """The intermediate process: read the request's config, fork each worker,
    write each pid (or one "-" line saying why not) to ``out``, exit.

    The request's fds: a generation's are the config memfd, one control fd
    per index, then the listeners; an older master's one worker's are its
    control fd, then the listeners.
    """
    try:
        # Before the workers exist: they are never the master's children under our name.
        set_process_name(code.name)   # the interpreter's, as a `python -m` worker has
        try:
            children, fd_map = _children(request, fds, code)
        except code.config_error as exc:
            os.write(out, f"-{'; '.join(exc.errors)}\n".encode())   # type: ignore[attr-defined]
            return
        except (ValueError, KeyError, TypeError, OSError) as exc:
            os.write(out, f"-a bad spawn request: {exc}\n".encode())
            return
        master_pid = int(request["master_pid"])
        for control, preforked in children:
            # Read by `python -m hapymaster.worker`; set here so a worker
            # looks the same both ways (the tests' fault hooks look for it).
            os.environ["HAPYMASTER_CONTROL_FD"] = str(control)
            try:
                worker = os.fork()
            except OSError as exc:
                os.write(out, f"-cannot fork a worker: {exc}\n".encode())
                return
            if worker == 0:
                os.close(out)
                _worker_child(fds, control, fd_map, master_pid, preforked,
                              code.worker_main.run)
            os.write(out, b"%d\n" % worker)
    finally:
        os._exit(0)


def _children(request: dict[str, Any], fds: list[int],
              code: _Code) -> tuple[list[tuple[int, Any]], dict[int, int]]:
    """(control fd, what the worker is told) for each worker, and the listener fd map."""
    if "indexes" not in request:
        if not fds:
            raise ValueError("a spawn request without the control fd")
        return [(fds[0], None)], dict(zip(request.get("listener_fds") or [], fds[1:]))
    indexes = [int(index) for index in request["indexes"]]
    if len(fds) < 1 + len(indexes):
        raise ValueError("a spawn request without its config and control fds")
    with os.fdopen(os.dup(fds[0]), "rb") as source:
        source.seek(0)
        data = source.read()
    # Inherited by every worker of the request. The master's own parse when
    # it runs this code (it checked); a pickle is trusted here, it comes from
    # our parent on a socketpair nobody else holds.
    if request.get("config") == "pickle":
        try:
            config = _pickle.loads(data)
        except Exception as exc:    # UnpicklingError, or a class this code lacks (AttributeError...)
            # Said on `out` like any bad request, not left to look like a crash.
            raise ValueError(f"cannot read the master's parsed config: "
                             f"{type(exc).__name__}: {exc}") from exc
    else:
        config = code.parse_config(data.decode(), str(request.get("config_path", "")))
    master_pid, generation = int(request["master_pid"]), int(request["generation"])
    controls = fds[1:1 + len(indexes)]
    fd_map = dict(zip(request.get("listener_fds") or [], fds[1 + len(indexes):]))
    return ([(control, code.worker_main.Preforked(config, generation, index, master_pid))
             for control, index in zip(controls, indexes)], fd_map)


def _worker_child(fds: list[int], control: int, fd_map: dict[int, int],
                  master_pid: int, preforked: Any, run: Any) -> None:
    """The forked worker: undo what is the template's, then the worker's own main."""
    code: Any = 1
    try:
        # Only its own control socket and the listeners: a sibling's control
        # socket held here would hide that sibling's exit from the master (no EOF).
        for fd in set(fds) - {control, *fd_map.values()}:
            os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # balance.Draws reseeds itself after fork (os.register_at_fork); no event
        # loop exists in the template, so run() makes a fresh one. The death
        # signal is armed by run() once the master adopted us.
        if preforked is None:
            die_with_reaper(master_pid)
        if os.environ.get("HAPYMASTER_PROFILE"):
            import cProfile
            profile = cProfile.Profile()
            code = profile.runcall(run, control, fd_map, preforked)
            profile.dump_stats(os.environ["HAPYMASTER_PROFILE"])
        else:
            code = run(control, fd_map, preforked)
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
    sys.exit(serve(int(fd_text), parses=os.environ.pop(PARSES_ENV, "") == "1"))
