"""The master CLI: a unix stream socket, one command per connection.

The client sends one line (and may half-close), gets the answer, and the
master closes. ``echo 'show proc' | socat - UNIX:SOCK`` works; for the
blocking ``reload`` give socat a longer idle timeout (``socat -t 30``).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import struct
import time

from .master import Master, Worker, WorkerState

log = logging.getLogger("hapymaster.mcli")

MAX_COMMAND = 64 * 1024
# A client that connects and sends no complete command within this is dropped:
# otherwise idle connections would pile up on a socket that can reload the service.
# It bounds only the wait for the command, not a blocking reload's answer.
IDLE_TIMEOUT = 10.0
# After the CLI stops accepting for a re-exec: a connection accepted just
# before gets its protocol within a loop iteration or two.
ACCEPT_SETTLE = 0.02

HELP = """\
The following commands are valid at this level:
  help                    : this message
  show proc               : the master and its workers, with reloads and uptime
  show version            : the master's version
  reload                  : reload the config; answers Success=1/0 when the new workers are READY or failed
  hard-reload             : reload, then terminate the previous workers instead of letting them finish
  upgrade                 : re-execute the master in place (same pid, sockets and workers), then reload
  hard-upgrade            : upgrade, then terminate the previous workers
  @<n> <command>          : send a command to worker n of the current generation (e.g. @1 show info)
  @!<pid> <command>       : send a command to the worker with that pid
  @* <command>            : send a command to every current worker
"""


def format_uptime(seconds: float) -> str:
    seconds = int(seconds)
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{days}d{hours:02d}h{minutes:02d}m{seconds:02d}s"


def show_proc(master: Master) -> str:
    now = time.monotonic()
    row = "{:<15} {:<15} {:<15} {:<15} {}"
    lines = [row.format("#<PID>", "<type>", "<reloads>", "<uptime>", "<version>"), "# master"]
    lines.append(row.format(os.getpid(), "master", f"{master.reloads} [failed: {master.failed_reloads}]",
                            format_uptime(now - master.started_at), master.version))

    def worker_row(worker: Worker) -> str:
        return row.format(worker.pid, "worker", worker.reloads,
                          format_uptime(now - worker.started_at), worker.version)

    lines.append("# workers")  # the current generation, and the next one while it starts
    lines.extend(worker_row(w) for w in master.processes
                 if w.generation >= master.generation and w.state is not WorkerState.LEAVING)
    lines.append("# old workers")
    lines.extend(worker_row(w) for w in master.old_workers())
    return "\n".join(lines) + "\n"


async def worker_command(master: Master, target: str, command: str) -> str:
    """``@<n>``, ``@!<pid>`` or ``@*``: route a command to worker CLIs."""
    if not command:
        return "Missing command after " + target + "\n"
    if target == "@*":
        workers = [w for w in master.current_workers() if w.state is WorkerState.READY]
        parts = []
        for worker in workers:
            answer = await _ask(worker, command)
            parts.append(f"# worker #{worker.index} pid {worker.pid}\n{answer}")
        return "".join(parts) if parts else "No worker is ready\n"
    worker = None
    if target.startswith("@!") and target[2:].isdigit():
        worker = master.find_worker(int(target[2:]))
    elif target[1:].isdigit():
        index = int(target[1:])
        worker = next((w for w in master.current_workers() if w.index == index), None)
    else:
        return f"Unknown target {target!r}: use @<n>, @!<pid> or @*\n"
    if worker is None:
        return f"No such worker: {target}\n"
    return await _ask(worker, command)


async def _ask(worker: Worker, command: str) -> str:
    try:
        answer = await worker.ask(command)
    except (ConnectionError, asyncio.TimeoutError) as exc:
        return f"{worker.describe()} did not answer: {exc or 'timeout'}\n"
    return answer if answer.endswith("\n") or not answer else answer + "\n"


async def execute(master: Master, line: str, client: "CliProtocol | None" = None) -> str:
    """Run one master CLI command from the public socket and return the answer.

    ``client`` is the connection it came on: a reload that re-executes the
    master carries it, and the new image answers on it.
    """
    words = line.split()
    if not words:
        return ""
    head = words[0]
    if head == "_send_status":
        # Only a worker's own socketpair may report status: anyone who can
        # reach this socket must not be able to fake a READY and make the
        # master stop the generation that is actually serving.
        log.warning("refused _send_status on the master socket")
        return "Permission denied: _send_status is only accepted from a worker's socketpair\n"
    if head.startswith("@"):
        return await worker_command(master, head, line.split(None, 1)[1] if len(words) > 1 else "")
    if words == ["help"]:
        return HELP
    if words == ["show", "proc"]:
        return show_proc(master)
    if words == ["show", "version"]:
        return master.version + "\n"
    if words in (["reload"], ["hard-reload"], ["upgrade"], ["hard-upgrade"]):
        if client is not None:
            client.waits_for_reload = True
        result = await master.request_reload(hard=head.startswith("hard-"),
                                             upgrade=head.endswith("upgrade"), client=client)
        return result.render()
    return f"Unknown command: {line.strip()[:200]!r}. Try 'help'.\n"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return pid, uid, gid


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except (OSError, ValueError):
        pass
    return set()


def peer_allowed(sock: socket.socket, path: str) -> tuple[bool, str]:
    """Is the peer root, the socket file's owner, or in its group?

    The file mode (0600) is the first line of defence; this is the second,
    for the day someone widens it (a chmod in a deployment script, a 0666
    umask in a container): the master CLI can reload and reconfigure the
    service, so it answers only whom the file's owner and group name.
    """
    pid, uid, gid = peer_credentials(sock)
    try:
        st = os.stat(path)
    except OSError:
        return uid == 0 or uid == os.geteuid(), f"pid {pid} uid {uid}"
    if uid in (0, st.st_uid, os.geteuid()) or gid == st.st_gid \
            or st.st_gid in _supplementary_groups(pid):
        return True, ""
    return False, f"pid {pid} uid {uid} gid {gid}"


class CliProtocol(asyncio.Protocol):
    def __init__(self, master: Master, server: "CliServer | None" = None):
        self.master = master
        self.server = server
        self.buffer = b""
        self.transport: asyncio.Transport | None = None
        self.started = False
        self.idle: asyncio.TimerHandle | None = None
        # Its command is a reload: a re-exec carries this connection, the new image answers.
        self.waits_for_reload = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.server is not None:
            self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        allowed, who = peer_allowed(sock, self.master.socket_path) if sock is not None \
            else (False, "unknown peer")
        if not allowed:
            log.warning("master CLI: refused a connection from %s (not root, not the "
                        "socket's owner or group)", who)
            self._reply("Permission denied\n")
            return
        self.idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self._idle_timeout)

    def _idle_timeout(self) -> None:
        if not self.started:
            log.info("master CLI: no command within %gs, closing", IDLE_TIMEOUT)
            self.started = True
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.idle is not None:
            self.idle.cancel()
        if self.server is not None:
            self.server.connections.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.started:
            return
        self.buffer += data
        if b"\n" in self.buffer:
            self._start(self.buffer.split(b"\n", 1)[0])
        elif len(self.buffer) > MAX_COMMAND:
            self._reply("Command too long\n")

    def eof_received(self) -> bool:
        if not self.started:
            self._start(self.buffer)
        return True  # keep the write side open for the answer

    def _start(self, raw: bytes) -> None:
        self.started = True
        if self.idle is not None:
            self.idle.cancel()
        line = raw.decode("utf-8", "replace").strip()
        asyncio.ensure_future(self._run(line))

    async def _run(self, line: str) -> None:
        try:
            answer = await execute(self.master, line, self)
        except Exception as exc:
            log.exception("master CLI command %r failed", line)
            answer = f"Internal error: {exc!r}\n"
        self._reply(answer)

    def fileno(self) -> int:
        """The connection's descriptor: what a re-exec carries to the new image."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        return sock.fileno() if sock is not None else -1

    def _reply(self, answer: str) -> None:
        self.started = True
        if self.idle is not None:
            self.idle.cancel()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(answer.encode())
            self.transport.close()


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead master; refuse if a master answers there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, f"another master is already listening on {path}")


class CliServer:
    """The master CLI's listening socket, and the asyncio server accepting on it.

    The server accepts on a duplicate of the socket, never on the socket
    itself: a re-exec in place stops accepting, lets the commands in progress
    answer, and hands the socket, still listening and its backlog filling,
    to the new image (the duplicate is close-on-exec). A client that connects meanwhile
    waits and is answered by the new image; none is refused.
    """

    def __init__(self, master: Master, listener: socket.socket):
        self.master = master
        self.listener = listener
        self.server: asyncio.AbstractServer | None = None
        self.accepting: socket.socket | None = None   # the duplicate the server accepts on
        self.connections: set[CliProtocol] = set()

    def fileno(self) -> int:
        return self.listener.fileno()

    async def start(self) -> None:
        self.accepting = self.listener.dup()
        self.server = await asyncio.get_running_loop().create_unix_server(
            lambda: CliProtocol(self.master, self), sock=self.accepting)

    async def quiesce(self, timeout: float) -> bool:
        """Stop accepting; True once no command is in progress but reloads waiting.

        A reload's client is carried across the re-exec, so it does not count.
        """
        if self.accepting is not None:
            # Not Server.close(): a connection accepted in this same loop
            # iteration gets its transport a moment later, and finding the
            # server closed it would be dropped unanswered (Python 3.11
            # asserts in Server._attach and leaves the socket to the GC: the
            # client saw its connection reset at the execve).
            asyncio.get_running_loop().remove_reader(self.accepting.fileno())
        # Those accepted just before get their protocol one or two loop
        # iterations later: let them appear before counting.
        await asyncio.sleep(ACCEPT_SETTLE)
        deadline = time.monotonic() + timeout
        while any(not c.waits_for_reload for c in self.connections):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def resume(self) -> None:
        """Accept again (the re-exec did not happen): a new server on a new duplicate."""
        if self.server is not None:
            self.server.close()
        await self.start()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        self.listener.close()


async def serve(master: Master) -> CliServer:
    path = master.socket_path
    if master.cli_fd is not None:
        # After a re-exec: the same listening socket, never unlinked or bound again.
        listener = socket.socket(fileno=master.cli_fd)
        log.info("master CLI on %s (kept across the re-exec)", path)
    else:
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # 0600: the master CLI can reload and reconfigure
        try:
            listener.bind(path)
        except OSError:
            listener.close()
            raise
        finally:
            os.umask(old_umask)
        listener.listen(100)
        log.info("master CLI on %s", path)
    listener.setblocking(False)
    server = CliServer(master, listener)
    await server.start()
    master.on_stop.append(lambda: _unlink_quietly(path))
    return server


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

