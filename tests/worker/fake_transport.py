"""Fake transports and an in-process worker, for the request path's edge cases.

``FakeTransport`` records what a Protocol writes and the calls it makes
(pause/resume reading, close, abort); ``inprocess_worker(config_text)``
builds a ``Worker`` on a real event loop that is never run, so a test feeds
bytes to the client and server Protocols and looks at what came out.
"""

from __future__ import annotations

from typing import Any

import uvloop

from hapymaster.config import parse_config
from hapymaster.worker.process import Worker


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000), keep: bool = True):
        self.peer = peer
        self.keep = keep            # False: count bytes only (measurements)
        self.written: list[bytes] = []
        self.size = 0
        self.calls: list[str] = []
        self.closing = False
        self.reading = True
        self.protocol: Any = None

    # what asyncio.Transport offers
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.size += len(data)
        if self.keep:
            self.written.append(bytes(data))

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        if not self.closing:
            self.calls.append("close")
        self.closing = True

    def abort(self) -> None:
        self.calls.append("abort")
        self.closing = True

    def pause_reading(self) -> None:
        self.calls.append("pause_reading")
        self.reading = False

    def resume_reading(self) -> None:
        self.calls.append("resume_reading")
        self.reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.calls.append("write_eof")

    # for the test
    def take(self) -> bytes:
        data = b"".join(self.written)
        self.written.clear()
        return data

    def lost(self, exc: Exception | None = None) -> None:
        """The transport ends: tell the protocol, as asyncio does after close()."""
        self.closing = True
        self.protocol.connection_lost(exc)


def inprocess_worker(config_text: str) -> Worker:
    """A Worker on the event loop the worker process uses (uvloop), never run."""
    loop = uvloop.new_event_loop()
    return Worker(parse_config(config_text, "test.yaml"), loop)


def connect(protocol: Any, transport: FakeTransport) -> FakeTransport:
    transport.protocol = protocol
    protocol.connection_made(transport)
    return transport
