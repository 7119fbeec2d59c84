"""The access log lines, HAProxy's ``httplog`` and ``tcplog`` formats.

Each line is built by one function from plain values, so that whatever
writes it (today a ``logging`` call in proxy_http / proxy_tcp) does not
need to know the request objects.
"""

from __future__ import annotations

import time

_last_second = 0
_last_date = ""


def log_date(now: float) -> str:
    """``25/Nov/2026:13:30:00.123`` as in HAProxy's logs (``now`` from time.time())."""
    global _last_second, _last_date
    second = int(now)
    if second != _last_second:
        _last_second = second
        _last_date = time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(now))
    return f"{_last_date}.{int((now - second) * 1000):03d}"


def ms(t: float, base: float) -> int:
    """Milliseconds from ``base`` to ``t``; -1 when ``t`` was never reached."""
    return -1 if t < 0 else int((t - base) * 1000)


def httplog_line(client: tuple[str, int], date: str, frontend: str, backend: str, server: str,
                 timers: tuple[int, int, int, int, int], status: int, bytes_out: int, term: str,
                 conns: tuple[int, int, int, int, int], backend_queue: int, method: str,
                 url: str, version: str) -> str:
    """client:port [date] frontend backend/server TR/Tw/Tc/Tr/Ta status bytes - - term
    actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue "request line"."""
    return (f"{client[0]}:{client[1]} [{date}] {frontend} {backend}/{server} "
            f"{timers[0]}/{timers[1]}/{timers[2]}/{timers[3]}/{timers[4]} "
            f"{status} {bytes_out} - - {term}-- "
            f"{conns[0]}/{conns[1]}/{conns[2]}/{conns[3]}/{conns[4]} 0/{backend_queue} "
            f"\"{method} {url} HTTP/{version}\"")


def tcplog_line(client: tuple[str, int], date: str, frontend: str, backend: str, server: str,
                timers: tuple[int, int, int], bytes_out: int, term: str,
                conns: tuple[int, int, int, int, int], backend_queue: int) -> str:
    """client:port [date] frontend backend/server Tw/Tc/Tt bytes term
    actconn/feconn/beconn/srv_conn/retries srv_queue/backend_queue."""
    return (f"{client[0]}:{client[1]} [{date}] {frontend} {backend}/{server} "
            f"{timers[0]}/{timers[1]}/{timers[2]} {bytes_out} {term} "
            f"{conns[0]}/{conns[1]}/{conns[2]}/{conns[3]}/{conns[4]} 0/{backend_queue}")
