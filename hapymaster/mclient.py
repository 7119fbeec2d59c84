"""The master CLI's client side: one command, one answer.

Its own module, importing only the C socket module: ``hapymaster reload``
(what systemd's ExecReload= runs at every reload) must not pay for
importing the master to send one line. Not even ``socket``: that module is
a Python layer over ``_socket`` whose start-up (building its enum classes
of constants) costs ~7 ms, a fifth of the command's whole run, and nothing
of it is used here: connect, send, read to EOF.
"""

from __future__ import annotations

import _socket


def client(path: str, command: str, timeout: float | None = None) -> str:
    """Send one command to a master CLI socket and return the whole answer."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks).decode("utf-8", "replace")
