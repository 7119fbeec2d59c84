"""The worker's end of the socketpair to the master.

The messages, their framing and the request/reply bookkeeping are in
``hapymaster.messages`` (the master's end uses the same). Here: what the
worker does with them. It answers ``cli`` requests with its CLI
(``hapymaster.worker.runtime``), asks the master to gather the counters of
every worker (for the stats page), sends ``_send_status READY`` once
just before its event loop runs, and its last counters (``final``) as it
exits. EOF means the master is gone.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from hapymaster import messages

if TYPE_CHECKING:
    from hapymaster.worker.process import Worker

log = logging.getLogger("hapymaster.worker")


class ControlChannel(messages.Channel):
    def __init__(self, worker: "Worker", leftover: bytes = b""):
        super().__init__(leftover)
        self.worker = worker

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        # Whatever ends the worker (soft stop done, SIGTERM, master gone) sets
        # exit_future; the master then still learns what this worker served.
        self.worker.exit_future.add_done_callback(lambda _: self.send_final_counters())

    def message_received(self, message: dict[str, Any]) -> None:
        if message.get("type") == messages.CLI:
            asyncio.ensure_future(self._cli(message))
        else:
            super().message_received(message)

    async def _cli(self, message: dict[str, Any]) -> None:
        from hapymaster.worker.runtime import execute
        command = str(message.get("command", ""))
        try:
            output = await execute(self.worker, command)
        except Exception as exc:  # noqa: BLE001 - a CLI bug must not kill the worker
            log.exception("cli command %r failed", command)
            output = f"Internal error: {exc}\n"
        self.reply(message, output)

    async def gather(self, command: str, timeout: float = 3.0) -> list[str] | None:
        """Ask the master to gather ``command`` (``_counters``); None if it cannot."""
        try:
            outputs = await self.request(messages.GATHER, timeout, command=command)
        except (ConnectionError, asyncio.TimeoutError):
            return None
        return [str(o) for o in outputs] if isinstance(outputs, list) else None

    def send_final_counters(self) -> None:
        """This worker's last counters, so that nothing it served is lost to the stats."""
        from hapymaster.worker.stats import export_counters
        self.send({"type": messages.FINAL, "counters": export_counters(self.worker)})

    def closed(self) -> None:
        self.worker.master_gone()
