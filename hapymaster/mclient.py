"""The master CLI's client side: one command, one answer.

Its own module, importing only ``socket``: ``hapymaster reload`` (what
systemd's ExecReload= runs at every reload) must not pay for importing the
master to send one line.
"""

from __future__ import annotations

import socket


def client(path: str, command: str, timeout: float | None = None) -> str:
    """Send one command to a master CLI socket and return the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(command.encode() + b"\n")
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "replace")
