"""The worker's end of the socketpair to the master.

Newline-delimited, both ways. A line starting with ``{`` is a JSON object
(``cli`` asks the worker's CLI, ``gathered`` answers our ``gather``); the
worker sends the text line ``_send_status READY`` once, just before its
event loop runs. EOF means the master is gone.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hapymaster.worker.process import Worker

log = logging.getLogger("hapymaster.worker")

MAX_LINE = 16 * 1024 * 1024


class ControlChannel(asyncio.Protocol):
    def __init__(self, worker: "Worker", leftover: bytes = b""):
        self.worker = worker
        self.transport: Any = None
        self.buffer = bytearray(leftover)
        self.next_id = 1
        self.waiting: dict[int, asyncio.Future] = {}

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.buffer:
            data, self.buffer = bytes(self.buffer), bytearray()
            self.worker.loop.call_soon(self.data_received, data)

    def send_line(self, text: str) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(text.encode() + b"\n")

    def send_json(self, message: dict[str, Any]) -> None:
        self.send_line(json.dumps(message, separators=(",", ":")))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                if len(self.buffer) > MAX_LINE:
                    log.error("control channel: line too long, dropped")
                    self.buffer.clear()
                return
            line = bytes(self.buffer[:end]).decode("utf-8", "replace").strip()
            del self.buffer[:end + 1]
            if line:
                self._handle(line)

    def _handle(self, line: str) -> None:
        if not line.startswith("{"):
            log.info("control channel: ignoring text line %r", line[:80])
            return
        try:
            message = json.loads(line)
        except ValueError:
            log.error("control channel: bad JSON %r", line[:80])
            return
        kind = message.get("type")
        if kind == "cli":
            asyncio.ensure_future(self._cli(message.get("id"), str(message.get("command", ""))))
        elif kind == "gathered":
            future = self.waiting.pop(message.get("id"), None)
            if future is not None and not future.done():
                future.set_result(list(message.get("outputs") or []))
        else:
            log.info("control channel: ignoring message type %r", kind)

    async def _cli(self, ident: Any, command: str) -> None:
        from hapymaster.worker.runtime import execute
        try:
            output = await execute(self.worker, command)
        except Exception as exc:  # noqa: BLE001 - a CLI bug must not kill the worker
            log.exception("cli command %r failed", command)
            output = f"Internal error: {exc}\n"
        self.send_json({"type": "cli_reply", "id": ident, "output": output})

    async def gather(self, command: str, timeout: float = 3.0) -> list[str] | None:
        """Run ``command`` on every current worker through the master; None if it cannot."""
        if self.transport is None or self.transport.is_closing():
            return None
        ident = self.next_id
        self.next_id += 1
        future = self.worker.loop.create_future()
        self.waiting[ident] = future
        self.send_json({"type": "gather", "id": ident, "command": command})
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            self.waiting.pop(ident, None)
            return None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self.waiting.values():
            if not future.done():
                future.set_result(None)
        self.waiting.clear()
        self.worker.master_gone()
