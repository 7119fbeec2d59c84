"""The messages between the master and a worker, both sides of the socketpair.

A worker's socketpair is created by the master for that worker alone; the
worker gets the other end at birth. On it, newline-delimited, both ways:

- the text line ``_send_status READY`` (worker → master, once, just before
  the worker's event loop runs; believed only on this socketpair);
- JSON objects with a ``type``:

  ==============  ================  ===========================================
  type            direction         meaning
  ==============  ================  ===========================================
  ``boot``        master → worker   the first line: generation, index, config
                                    text (not for a worker the template forked
                                    with the config parsed), listener fds,
                                    runtime state
  ``cli``         master → worker   request: run a worker CLI ``command``;
                                    answered by ``cli_reply`` (``output``)
  ``gather``      worker → master   request: ``command`` ``_counters`` of
                                    every worker; answered by ``gathered``
                                    (``outputs``: JSON texts to merge)
  ``final``       worker → master   the worker's last ``counters``, sent as it
                                    exits (no answer)
  ==============  ================  ===========================================

A request carries an ``id`` chosen by its sender; its answer carries the
same ``id``. ``Channel`` does this bookkeeping for both sides: each request
waits on its own id, whatever order the answers come in. (The master once
removed the *latest* id when any request finished, so with two requests in
flight one answer was dropped and waited out its timeout.)

Kinds and fields, once shipped, keep their names: after a package upgrade
the postinst reloads, and the master still running the old code starts
workers running the new code. An older peer ignores a kind it does not know
(``final`` here), so a new kind must only ever add.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

log = logging.getLogger("hapymaster.messages")

READY_LINE = "_send_status READY"

BOOT = "boot"
CLI = "cli"
GATHER = "gather"
FINAL = "final"
# Request kind -> (its answer's kind, the field that carries the result).
ANSWERS = {CLI: ("cli_reply", "output"), GATHER: ("gathered", "outputs")}
_RESULT_FIELD = dict(ANSWERS.values())

# A boot message carries the whole config text: allow big lines.
MAX_LINE = 16 * 1024 * 1024


def encode(message: dict[str, Any]) -> bytes:
    """One JSON object on one line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def boot(*, generation: int, index: int, master_pid: int, config_path: str,
         config_text: str | None, listeners: list[tuple[str, int]], state: Any) -> dict[str, Any]:
    """The first line a worker reads (hapymaster.worker.__main__.read_boot).

    ``config_text`` None: the worker was forked with its config already
    parsed (the template parses it once per spawn request), so it is not sent.
    """
    message = {"type": BOOT, "generation": generation, "index": index, "master_pid": master_pid,
               "config_path": config_path,
               "listeners": [{"address": address, "fd": fd} for address, fd in listeners],
               "state": state}
    if config_text is not None:
        message["config_text"] = config_text
    return message


class Channel(asyncio.Protocol):
    """One end of a worker's socketpair: framing, and requests matched to replies.

    Subclasses handle what is not a reply: ``message_received`` (a JSON
    object), ``text_received`` (any other line) and ``closed`` (EOF).
    """

    def __init__(self, leftover: bytes = b""):
        self.transport: Any = None
        self._buffer = bytearray(leftover)
        self._last_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}

    # --- subclass hooks ---------------------------------------------------------

    def message_received(self, message: dict[str, Any]) -> None:
        log.info("control channel: ignoring message type %r", message.get("type"))

    def text_received(self, line: str) -> None:
        log.info("control channel: ignoring text line %r", line[:80])

    def closed(self) -> None:
        pass

    # --- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self._buffer:
            # Bytes read together with the boot message, before this protocol existed.
            asyncio.get_running_loop().call_soon(self.data_received, b"")

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_LINE:
                    log.error("control channel: line too long, dropped")
                    self._buffer.clear()
                return
            line = bytes(self._buffer[:end]).decode("utf-8", "replace").strip()
            del self._buffer[:end + 1]
            if line:
                self._line_received(line)

    def _line_received(self, line: str) -> None:
        if not line.startswith("{"):
            self.text_received(line)
            return
        try:
            message = json.loads(line)
        except ValueError:
            log.error("control channel: bad JSON %r", line[:80])
            return
        if not isinstance(message, dict):
            return
        result_field = _RESULT_FIELD.get(message.get("type"))  # type: ignore[arg-type]
        if result_field is not None:
            future = self._waiting.get(message.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(message.get(result_field))
            return
        self.message_received(message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the control channel closed"))
        self._waiting.clear()
        self.closed()

    # --- sending ----------------------------------------------------------------

    def unread(self) -> bytes:
        """What was received and is not a whole line yet (the master's re-exec carries it)."""
        return bytes(self._buffer)

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send_line(self, text: str) -> None:
        if self.is_open:
            self.transport.write(text.encode() + b"\n")

    def send(self, message: dict[str, Any]) -> None:
        if self.is_open:
            self.transport.write(encode(message))

    def reply(self, request: dict[str, Any], result: Any) -> None:
        """Answer ``request`` (a ``cli`` or ``gather``) with ``result``."""
        kind, result_field = ANSWERS[str(request.get("type"))]
        self.send({"type": kind, "id": request.get("id"), result_field: result})

    async def request(self, kind: str, timeout: float, **fields: Any) -> Any:
        """Send a request (``cli`` or ``gather``) and return the result of its answer.

        Raises ConnectionError if the channel is or gets closed, and
        asyncio.TimeoutError if no reply came within ``timeout``.
        """
        if not self.is_open:
            raise ConnectionError("the control channel is closed")
        self._last_id += 1
        ident = self._last_id
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[ident] = future
        self.send({"type": kind, "id": ident, **fields})
        try:
            return await asyncio.wait_for(future, timeout)
        finally:
            # This request's own id: never another one still in flight.
            self._waiting.pop(ident, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
