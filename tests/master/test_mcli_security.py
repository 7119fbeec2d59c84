"""The master CLI's own defences: who may talk to it, for how long, how much.

The socket can reload and reconfigure the service, so its 0600 mode is not
the only check: the master asks the kernel who is connecting (SO_PEERCRED)
and answers only root, the socket's owner or a member of its group — even
when the file mode was widened by mistake.
"""

from __future__ import annotations

import os
import socket
import time

from master_harness import free_port, http_config, wait_for

NOBODY = 65534
# A gid nobody has: the socket file is not in it.
STRANGER_GID = 54321

def ctl_as(path: str, command: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> str:
    """One master-CLI command from a child process running as another user.

    A fork, not an exec: the interpreter may live where that user cannot
    read. The child enters the socket's directory while still root and
    connects by a relative name, so the test tree's private parents need not
    be opened to that user.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to the user, ask, hand the answer back
        try:
            os.close(read_end)
            os.chdir(os.path.dirname(path))
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(os.path.basename(path))
                try:
                    sock.sendall(command.encode() + b"\n")
                    sock.shutdown(socket.SHUT_WR)
                except BrokenPipeError:
                    pass  # refused before it could send: the answer is still there
                try:
                    while chunk := sock.recv(65536):
                        os.write(write_end, chunk)
                except ConnectionResetError:
                    pass  # a refusal closes with the command unread: a reset after the answer
        except BaseException as exc:  # noqa: BLE001 - report it to the test, not to pytest
            os.write(write_end, f"client error: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    answer = b""
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    return answer.decode()


def _widen(path: str) -> None:
    """What a careless deployment does: everyone may connect to the file."""
    os.chmod(path, 0o666)
    os.chmod(os.path.dirname(path), 0o755)


def test_a_stranger_is_refused_even_with_a_world_writable_socket(master_factory, http_backend):
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root to connect as another user")
    master = master_factory(http_config(free_port(), [http_backend("a").address]))
    _widen(master.socket_path)
    before = master.show_proc()
    answer = ctl_as(master.socket_path, "reload", NOBODY, STRANGER_GID)
    assert answer == "Permission denied\n"
    assert "refused a connection from pid" in master.log()
    # Nothing ran: no reload, the same workers.
    assert master.show_proc() == before
    assert "reload requested" not in master.log()


def test_the_socket_group_and_root_are_allowed(master_factory, http_backend):
    if os.geteuid() != 0:
        import pytest
        pytest.skip("needs root to connect as another user")
    master = master_factory(http_config(free_port(), [http_backend("a").address]))
    _widen(master.socket_path)
    os.chown(master.socket_path, -1, STRANGER_GID)
    # Primary group, then a supplementary one: both are "in the socket's group".
    assert "# master" in ctl_as(master.socket_path, "show proc", NOBODY, STRANGER_GID)
    assert "# master" in ctl_as(master.socket_path, "show proc", NOBODY, NOBODY,
                                (STRANGER_GID,))
    assert "# master" in master.ctl("show proc")


def test_an_idle_cli_connection_is_closed(master_factory, http_backend):
    master = master_factory(http_config(free_port(), [http_backend("a").address]))
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(30)
    sock.connect(master.socket_path)
    started = time.monotonic()
    assert sock.recv(100) == b""          # EOF: the master closed it
    waited = time.monotonic() - started
    assert 5 < waited < 25, waited        # IDLE_TIMEOUT (10 s), not at once, not never
    sock.close()
    assert "# master" in master.ctl("show proc")   # and the CLI still serves


def test_a_command_line_is_bounded(master_factory, http_backend):
    master = master_factory(http_config(free_port(), [http_backend("a").address]))
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(master.socket_path)
    try:
        sock.sendall(b"x" * (128 * 1024))
    except (BrokenPipeError, ConnectionResetError):
        pass
    answer = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        answer += chunk
    sock.close()
    assert answer == b"Command too long\n"
    wait_for(lambda: "# master" in master.ctl("show proc"), what="CLI still serving")
