"""Listener start/pause/resume/close in process: a pause or close that comes
while start() is awaiting the loop is applied, not lost."""

from __future__ import annotations

import asyncio
import socket

import pytest

from hapymaster.worker.process import Listener
from worker_harness import free_listener


class GatedLoop:
    """The real loop, except that create_server waits until the test opens the gate
    (as the stdlib loop yields inside create_server, and a resume does)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def create_server(self, *args, **kwargs):
        self.waiting.set()
        await self.gate.wait()
        return await self.loop.create_server(*args, **kwargs)


class Counting(asyncio.Protocol):
    made = 0

    def connection_made(self, transport):
        Counting.made += 1
        transport.close()


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("request_during_start", ["close", "pause"])
def test_pause_or_close_while_start_awaits_is_applied(request_during_start):
    master_copy = free_listener()       # the master keeps the socket listening
    port = master_copy.getsockname()[1]
    sock = master_copy.dup()
    sock.setblocking(False)
    loop = asyncio.new_event_loop()

    async def scenario():
        gated = GatedLoop(loop)
        listener = Listener(gated, sock, Counting)
        starting = asyncio.ensure_future(listener.start())
        await gated.waiting.wait()
        getattr(listener, request_during_start)()
        gated.gate.set()
        await starting
        assert listener.server is None
        Counting.made = 0
        with socket.create_connection(("127.0.0.1", port)):
            await settle()
        assert Counting.made == 0       # nobody accepted it
        if request_during_start == "pause":
            listener.resume()
            await settle()
            assert listener.server is not None
            Counting.made = 0
            with socket.create_connection(("127.0.0.1", port)):
                await settle()
            assert Counting.made >= 1    # the one left in the backlog, and this one
            listener.close()
            assert listener.server is None

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
        sock.close()
        master_copy.close()


def test_pause_and_resume_while_start_awaits_serves_once():
    master_copy = free_listener()       # the master keeps the socket listening
    port = master_copy.getsockname()[1]
    sock = master_copy.dup()
    sock.setblocking(False)
    loop = asyncio.new_event_loop()

    async def scenario():
        gated = GatedLoop(loop)
        listener = Listener(gated, sock, Counting)
        starting = asyncio.ensure_future(listener.start())
        await gated.waiting.wait()
        listener.pause()
        listener.resume()               # must not start a second server
        gated.gate.set()
        await starting
        await settle()
        assert listener.server is not None and listener.server.is_serving()
        Counting.made = 0
        with socket.create_connection(("127.0.0.1", port)):
            await settle()
        assert Counting.made == 1
        server = listener.server
        listener.close()
        assert not server.is_serving()

    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()
        sock.close()
        master_copy.close()
