"""hapymaster.worker.pool: the idle server connections of one server."""

from __future__ import annotations

from fake_transport import FakeTransport
from hapymaster.worker import pool


class Conn:
    def __init__(self) -> None:
        self.transport = FakeTransport()

    def close(self) -> None:
        self.transport.close()


def test_take_gives_the_most_recent_open_connection():
    p = pool.ServerPool()
    old, gone, new = Conn(), Conn(), Conn()
    for conn in (old, gone, new):
        assert p.put(conn)
    assert p.take() is new
    gone.transport.close()          # the server closed it while it was idle
    assert p.take() is old          # the closed one is skipped and dropped
    assert p.take() is None and len(p) == 0


def test_put_beyond_the_limit_is_refused_and_close_all_closes():
    p = pool.ServerPool()
    conns = [Conn() for _ in range(pool.MAX_IDLE_PER_SERVER)]
    assert all(p.put(conn) for conn in conns)
    assert not p.put(Conn())
    p.remove(conns[0])
    assert len(p) == pool.MAX_IDLE_PER_SERVER - 1
    p.close_all()
    assert len(p) == 0 and all(c.transport.closing for c in conns[1:])
    assert not conns[0].transport.closing
