"""Idle keep-alive connections to one server, shared by every client of a worker.

A connection goes back to its server's pool when its response ended
cleanly and the server keeps it alive; a request takes the most recently
used one (the likeliest to be still open on the server's side). The pool
knows connections only as objects with ``transport`` and ``close()``: it is
the same for any protocol that keeps server connections.
"""

from __future__ import annotations

from typing import Any, Final

# Beyond this many idle connections to one server, a freed one is closed.
MAX_IDLE_PER_SERVER: Final = 256


class ServerPool:
    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: list[Any] = []

    def take(self) -> Any:
        """An idle connection still open, or None."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if transport is not None and not transport.is_closing():
                return conn
        return None

    def put(self, conn: Any) -> bool:
        """Keep ``conn`` for a later request; False when the pool is full."""
        if len(self.idle) >= MAX_IDLE_PER_SERVER:
            return False
        self.idle.append(conn)
        return True

    def remove(self, conn: Any) -> None:
        """``conn`` was closed (by the server, or by us) while idle."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_all(self) -> None:
        """Close every idle connection: the server left the rotation, or the worker stops."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()

    def __len__(self) -> int:
        return len(self.idle)
