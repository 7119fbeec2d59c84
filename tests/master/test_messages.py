"""In-process: the socketpair protocol (hapymaster.messages) over a real
socketpair, and the counter book the master keeps across reloads."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from hapymaster import messages
from hapymaster.counters import CounterBook, merge


class Answering(messages.Channel):
    """Answers ``cli`` requests, each after the delay the request names."""

    def message_received(self, message: dict[str, Any]) -> None:
        async def answer() -> None:
            await asyncio.sleep(float(message["delay"]))
            self.reply(message, f"answer to {message['command']}")
        asyncio.ensure_future(answer())


async def channel_pair() -> tuple[messages.Channel, Answering]:
    loop = asyncio.get_running_loop()
    left, right = socket.socketpair()
    _, asking = await loop.create_unix_connection(messages.Channel, sock=left)
    _, answering = await loop.create_unix_connection(Answering, sock=right)
    return asking, answering


def test_requests_in_flight_each_get_their_own_reply():
    """Replies come back in another order than the requests went out, in
    separate reads: each request still gets its own (the master once dropped
    the newest id whenever any request finished)."""
    async def main() -> list[str]:
        asking, answering = await channel_pair()
        try:
            return await asyncio.gather(
                asking.request(messages.CLI, 5.0, command="slow", delay=0.3),
                asking.request(messages.CLI, 5.0, command="quick", delay=0.0),
                asking.request(messages.CLI, 5.0, command="middle", delay=0.1))
        finally:
            asking.close()
            answering.close()
    assert asyncio.run(main()) == ["answer to slow", "answer to quick", "answer to middle"]


def test_request_fails_when_the_channel_closes():
    async def main() -> None:
        asking, answering = await channel_pair()
        pending = asyncio.ensure_future(asking.request(messages.CLI, 5.0, command="x",
                                                       delay=10))
        await asyncio.sleep(0.05)
        answering.close()
        with pytest.raises(ConnectionError):
            await pending
        with pytest.raises(ConnectionError):
            await asking.request(messages.CLI, 5.0, command="y", delay=0)
    asyncio.run(main())


def part(req: int, smax: int = 0, scur: int = 0) -> dict[str, Any]:
    return {"frontends": {"web": {"req_tot": req, "smax": smax, "scur": scur}},
            "backends": {"app": {"req_tot": req, "servers": {"s1": {"stot": req}}}}}


def test_counter_book_never_goes_down():
    book = CounterBook()
    first = book.totals({1: part(5, smax=3, scur=2), 2: part(4, smax=7, scur=1)})
    assert first["frontends"]["web"] == {"req_tot": 9, "smax": 7, "scur": 3}
    assert first["backends"]["app"]["servers"]["s1"] == {"stot": 9}
    # Worker 1 reports its last counters and leaves; worker 3 is new.
    book.seen(1, part(6, smax=3))
    book.retire(1)
    after = book.totals({2: part(4, smax=7, scur=1), 3: part(2, scur=4)})
    assert after["frontends"]["web"] == {"req_tot": 12, "smax": 7, "scur": 5}
    assert after["workers"] == 2
    # A stale answer (overtaken by a newer one) cannot move a total back.
    assert book.totals({2: part(1), 3: part(2)})["frontends"]["web"]["req_tot"] == 12
    # A worker that did not answer this scrape still counts, but not in the gauges.
    silent = book.totals({3: part(2)})
    assert silent["frontends"]["web"]["req_tot"] == 12 and silent["frontends"]["web"]["scur"] == 0


def test_merge_sums_totals_and_keeps_peaks():
    merged = merge([part(1, smax=4, scur=1), part(2, smax=2, scur=3)])
    assert merged["frontends"]["web"] == {"req_tot": 3, "smax": 4, "scur": 4}
