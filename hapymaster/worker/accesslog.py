"""The access log: HAProxy's httplog and tcplog lines, batched, never blocking.

The request path hands the values it holds to ``AccessLog.http`` (or
``tcp``) as positional arguments; that call only appends them to a list and,
for the first record of a batch, arms one ``loop.call_soon(flush)``. The
flush, once per event-loop iteration (or when ``BATCH_MAX`` records are
waiting), formats the lines and hands them to the sink:

- ``stderr`` / ``file``: one ``write`` of the whole batch, on a descriptor
  that never blocks;
- ``journal``: one datagram per entry to journald's native socket, the
  format ``systemd.journal.send`` writes, with the structured fields;
- ``syslog``: one RFC 3164 or 5424 datagram per line, to a unix socket
  (``/dev/log``) or UDP, as HAProxy's ``log`` does.

A sink that cannot take a line now (a full pipe or disk, a journal or syslog
daemon that is behind) drops it and counts it in ``dropped``: a worker never
waits for its log. One warning when dropping starts, one summary when lines
go through again. Python's ``logging`` is not on this path: it cost ~13 us
per record, more than the rest of a keep-alive request.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import socket
import stat
import time
from typing import Any, Callable

from mypy_extensions import mypyc_attr

from hapymaster.config import SYSLOG_FACILITIES, AccessLogTarget
from hapymaster.sdnotify import (JOURNAL_SOCKET, journal_field, journal_socket,
                                 nonblocking_stderr, under_journald)

log = logging.getLogger("hapymaster.worker")

# Records waiting beyond this are flushed at once instead of at the end of the
# iteration: it bounds the memory held and keeps one write under a pipe's
# default 64 KiB (records are ~150 bytes).
BATCH_MAX = 256

# Bytes that HAProxy's logs show as #XX in a URL or method (its url_encode_map:
# controls, DEL and above, '"' and '#'): a log line stays one printable line
# whatever the client sent.
_ESCAPED = bytes(range(0, 32)) + b'"#' + bytes(range(127, 256))
_NEEDS_ESCAPE = re.compile(rb'[\x00-\x1f"#\x7f-\xff]').search
_ESCAPE_TABLE = ["#%02X" % b if b in _ESCAPED else chr(b) for b in range(256)]

# A pipe write up to this size is never interleaved with another writer's
# (several workers, the master, share one stderr pipe): batches are cut at
# line ends to stay under it.
PIPE_BUF = 4096

_SEVERITY_INFO = 6
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def escape(data: bytes) -> str:
    """``data`` as it may appear in a log line: #XX for what HAProxy escapes."""
    if not _NEEDS_ESCAPE(data):
        return data.decode("ascii")
    table = _ESCAPE_TABLE
    return "".join([table[b] for b in data])


class _Stamp:
    """A time stamp rendered by ``render`` from the local time, once per second."""

    def __init__(self, render: Callable[[time.struct_time], Any]) -> None:
        self.render = render
        self._second = -1
        self._text: Any = ""

    def __call__(self, wall: float) -> Any:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._text = self.render(time.localtime(second))
        return self._text


def _stderr_stamp(tm: time.struct_time) -> str:
    """The stderr logs' ``2026-12-02 14:15:00``."""
    return time.strftime("%Y-%m-%d %H:%M:%S", tm)


def _rfc5424_stamp(tm: time.struct_time) -> tuple[str, str]:
    """``(2026-12-02T14:15:00, +01:00)``: the fraction goes between the two."""
    offset = time.strftime("%z", tm)
    return time.strftime("%Y-%m-%dT%H:%M:%S", tm), f"{offset[:3]}:{offset[3:]}"


def _rfc3164_stamp(tm: time.struct_time) -> str:
    """RFC 3164: ``Dec  2 14:15:00``, the day padded with a space."""
    return "%s %2d %s" % (_MONTHS[tm.tm_mon - 1], tm.tm_mday, time.strftime("%H:%M:%S", tm))


# --- sinks ------------------------------------------------------------------------


# Compiled by mypyc (setup.py), whose classes only compiled code may subclass
# unless said otherwise: the tests' sinks are interpreted subclasses.
@mypyc_attr(allow_interpreted_subclasses=True)
class Sink:
    """Where formatted entries go.

    ``render`` turns a batch's lines into what ``send`` takes; ``send``
    never blocks and returns how many lines it had to drop, and why.
    """

    name = "?"

    def render(self, records: list[tuple[Any, ...]], lines: list[str], wall: float) -> Any:
        raise NotImplementedError

    def send(self, rendered: Any) -> tuple[int, OSError | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class StreamSink(Sink):
    """stderr or a file: the batch's lines in one write, dropped when it would block."""

    def __init__(self, fd: int, name: str, role_label: str, check_path: str | None = None):
        self.fd = fd
        self.name = name
        self.check_path = check_path
        self._checked = 0
        self.stamp = _Stamp(_stderr_stamp)
        # A regular file takes any write whole; a pipe only up to PIPE_BUF.
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        self.piece = 1 << 62 if regular else PIPE_BUF
        # The format of sdnotify's stderr lines, so that a log read by eye
        # (or by a test) looks the same as before.
        self.middle = f" hapymaster[{os.getpid()}] {role_label} info: "
        # What a partial write left of its last line: written first next time,
        # so the stream never has half a line followed by another one.
        self.carry = b""

    def render(self, records: list[tuple[Any, ...]], lines: list[str], wall: float) -> bytes:
        head = self.stamp(wall) + self.middle
        text = head + ("\n" + head).join(lines) + "\n"
        return self.carry + text.encode("utf-8", "surrogateescape")

    def send(self, data: bytes) -> tuple[int, OSError | None]:
        if self.check_path is not None:
            self._reopen_if_moved(self.check_path)
        carried = len(self.carry)
        view = memoryview(data)
        pos, size, piece = 0, len(data), self.piece
        while pos < size:
            end = size
            if end - pos > piece:
                cut = data.rfind(b"\n", pos, pos + piece)
                end = cut + 1 if cut >= 0 else data.find(b"\n", pos + piece) + 1
            try:
                pos += os.write(self.fd, view[pos:end])
            except OSError as exc:
                if pos == 0 and carried:
                    return data.count(b"\n", carried), exc      # the carry waits
                self.carry = b""
                return data.count(b"\n", pos), exc
            if pos < end:
                # Cut inside a line: keep the rest of that line for next time,
                # drop the whole lines after it.
                line_end = data.find(b"\n", pos) + 1
                self.carry = data[pos:line_end]
                return data.count(b"\n", line_end), OSError(errno.EAGAIN, "partial write")
        self.carry = b""
        return 0, None

    def _reopen_if_moved(self, path: str) -> None:
        # logrotate's default (rename, then create) leaves us writing to the
        # renamed file; look once a second whether the path is still ours.
        now = int(time.monotonic())
        if now == self._checked:
            return
        self._checked = now
        try:
            here = os.stat(path)
            mine = os.fstat(self.fd)
            if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
                return
        except OSError:
            pass
        try:
            fd = open_log_file(path)
        except OSError as exc:
            log.warning("access log: cannot reopen %s: %s", self.check_path, exc.strerror)
            return
        os.close(self.fd)
        self.fd = fd
        self.carry = b""

    def close(self) -> None:
        if self.carry:
            self.send(b"")      # the end of a line a partial write cut, if it goes now
        if self.fd > 2:
            os.close(self.fd)
            self.fd = -1


class DatagramSink(Sink):
    """One datagram per line, never waiting: what the socket cannot take is lost and counted."""

    sock: socket.socket
    target: Any

    def send(self, datagrams: list[bytes]) -> tuple[int, OSError | None]:
        sendto = self.sock.sendto
        target = self.target
        lost = 0
        error = None
        for datagram in datagrams:
            try:
                sendto(datagram, target)
            except OSError as exc:      # EAGAIN, ENOBUFS, ECONNREFUSED, ENOENT...
                lost += 1
                error = exc
        return lost, error

    def close(self) -> None:
        self.sock.close()


class JournalSink(DatagramSink):
    """journald's native protocol: one datagram per entry, the fields as ``KEY=value`` lines."""

    def __init__(self, path: str, fixed: dict[str, str]):
        self.name = f"journal {path}"
        self.target = path
        self.sock = journal_socket()
        self.fixed = b"".join(journal_field(k.encode(), v.encode()) for k, v in fixed.items())

    def render(self, records: list[tuple[Any, ...]], lines: list[str], wall: float
               ) -> list[bytes]:
        out = []
        fixed = self.fixed
        for record, line in zip(records, lines):
            message = line.encode("utf-8", "surrogateescape")
            if b"\n" in message:
                head = journal_field(b"MESSAGE", message)
            else:
                head = b"MESSAGE=" + message + b"\n"
            out.append(head + fixed + _journal_fields(record))
        return out



class SyslogSink(DatagramSink):
    """HAProxy's ``log``: RFC 3164 or 5424 datagrams to a unix socket or UDP."""

    def __init__(self, address: str, facility: str, fmt: str):
        self.name = f"syslog {address}"
        self.fmt = fmt
        self.pri = "<%d>" % (SYSLOG_FACILITIES.index(facility) * 8 + _SEVERITY_INFO)
        self.pid = os.getpid()
        self.hostname = socket.gethostname() or "-"
        if address.startswith("/"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.target: Any = address
        else:
            host, _, port = address.rpartition(":")
            # Resolved once: a name looked up per datagram would be a DNS query per request.
            family, kind, proto, _, self.target = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
            self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self._stamp = _Stamp(_rfc5424_stamp if fmt == "rfc5424" else _rfc3164_stamp)

    def _header(self, wall: float) -> str:
        if self.fmt == "rfc5424":
            day, offset = self._stamp(wall)
            return "%s1 %s.%06d%s %s hapymaster %d - - " % (
                self.pri, day, (wall - int(wall)) * 1e6, offset, self.hostname, self.pid)
        return "%s%s hapymaster[%d]: " % (self.pri, self._stamp(wall), self.pid)

    def render(self, records: list[tuple[Any, ...]], lines: list[str], wall: float
               ) -> list[bytes]:
        head = self._header(wall)
        return [(head + line).encode("utf-8", "surrogateescape") for line in lines]



def open_log_file(path: str) -> int:
    # O_APPEND: lines from several workers (and logrotate's copytruncate) never
    # overwrite each other; O_NONBLOCK matters for a FIFO, not for a file.
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC,
                   0o640)


def worker_fields(generation: int | None) -> dict[str, str]:
    """The journal fields every entry of this worker carries (as sdnotify's handler sets)."""
    fields = {"PRIORITY": str(_SEVERITY_INFO), "SYSLOG_IDENTIFIER": "hapymaster",
              "LOGGER": "hapymaster.access", "HAPYMASTER_ROLE": "worker",
              "HAPYMASTER_PID": str(os.getpid())}
    if generation is not None:
        fields["HAPYMASTER_GENERATION"] = str(generation)
    return fields


def open_sink(target: AccessLogTarget, generation: int | None) -> Sink:
    """Open the sink ``global.access_log`` names; before privileges are dropped."""
    kind = target.target
    if kind is None:
        # Unset: wherever the rest of the worker's logs go (sdnotify's choice).
        kind = "journal" if under_journald() else "stderr"
    if kind == "journal":
        return JournalSink(target.address or JOURNAL_SOCKET, worker_fields(generation))
    if kind == "syslog":
        return SyslogSink(target.address or "/dev/log", target.facility, target.format)
    label = "worker" if generation is None else f"worker[gen {generation}]"
    if kind == "file":
        assert target.address is not None
        return StreamSink(open_log_file(target.address), f"file {target.address}", label,
                          check_path=target.address)
    return StreamSink(nonblocking_stderr(), "stderr", label)


# --- the log ------------------------------------------------------------------------


# An http() record has this many fields, a tcp() one fewer: that is how a
# batch holding both tells them apart without a tag per record.
HTTP_FIELDS = 23
TCP_FIELDS = 18


def _journal_fields(record: tuple[Any, ...]) -> bytes:
    if len(record) == HTTP_FIELDS:
        return b"HAPYMASTER_FRONTEND=%s\nHAPYMASTER_BACKEND=%s\nHAPYMASTER_SERVER=%s\n" \
               b"HAPYMASTER_STATUS=%d\nHAPYMASTER_CLIENT=%s\n" % (
                   record[0].encode(), record[3].encode(), record[4].encode(), record[11],
                   record[1].encode())
    return b"HAPYMASTER_FRONTEND=%s\nHAPYMASTER_BACKEND=%s\nHAPYMASTER_SERVER=%s\n" \
           b"HAPYMASTER_CLIENT=%s\n" % (
               record[0].encode(), record[3].encode(), record[4].encode(), record[1].encode())


def _day(second: int) -> str:
    """``02/Dec/2026:14:15:00``, HAProxy's log date to the second."""
    return time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(second))


def _ms(t: float, base: float) -> int:
    return -1 if t < 0 or base < 0 else int((t - base) * 1000)


class AccessLog:
    """One per worker: the records of this loop iteration, and the sink they go to."""

    def __init__(self, loop: Any, sink: Sink):
        self.loop = loop
        self.sink = sink
        self.records: list[tuple[Any, ...]] = []
        self.armed = False
        self.dropped = 0          # lines lost since the worker started (show info)
        self.dropping = 0         # lines lost since the sink last took one
        self._day_second = -1     # format()'s date cache
        self._day = ""
        self._methods: dict[bytes, str] = {}

    # The two calls of the request path. Nothing is formatted here: the
    # arguments are kept as the tuple the call made anyway.

    def http(self, *record: Any) -> None:
        """One httplog line. Arguments, in this order:

        frontend name, client ip, client port, backend name, server name
        (``<NOSRV>``), then loop-clock times: start, head
        complete, queue left, connected, response head, end (-1: did not
        happen); status (0: none), bytes to the client, termination state
        (two letters), actconn, feconn, beconn, srv_conn, retries,
        backend queue, method (bytes), URL (bytes), HTTP version (``1.1``).
        """
        records = self.records
        records.append(record)
        if not self.armed:
            self.armed = True
            self.loop.call_soon(self.flush)
        elif len(records) >= BATCH_MAX:
            self._write()

    def tcp(self, *record: Any) -> None:
        """One tcplog line. Arguments, in this order:

        frontend name, client ip, client port, backend name, server name,
        accept time (wall clock), then loop-clock times: start,
        queue left, connected, end; bytes to the client, termination state,
        actconn, feconn, beconn, srv_conn, retries, backend queue.
        """
        records = self.records
        records.append(record)
        if not self.armed:
            self.armed = True
            self.loop.call_soon(self.flush)
        elif len(records) >= BATCH_MAX:
            self._write()

    def flush(self) -> None:
        """Format what this iteration logged and hand it to the sink in one go."""
        self.armed = False
        self._write()

    def _write(self) -> None:
        records = self.records
        if not records:
            return
        self.records = []
        wall = time.time()
        lines = self.format(records, wall)
        sink = self.sink
        lost, error = sink.send(sink.render(records, lines, wall))
        if lost:
            self.dropped += lost
            if not self.dropping:
                log.warning("access log: %s does not take lines (%s); dropping them until it "
                            "does", sink.name, error.strerror if error else "?")
            self.dropping += lost
        elif self.dropping:
            log.warning("access log: %s takes lines again; %d line(s) dropped meanwhile",
                        sink.name, self.dropping)
            self.dropping = 0

    def format(self, records: list[tuple[Any, ...]], wall: float) -> list[str]:
        """HAProxy's httplog / tcplog lines for ``records``, taken at ``wall`` (time.time())."""
        # The records hold loop-clock times; one offset per batch turns them
        # into the wall-clock date HAProxy prints (the request's start).
        # What is inlined here (the date cache, the ASCII check of the URL)
        # was a function call per record: ~1 us of the ~3 us a line took.
        offset = wall - self.loop.time()
        day_second, day = self._day_second, self._day
        methods = self._methods
        needs_escape = _NEEDS_ESCAPE
        lines: list[str] = []
        append = lines.append
        for r in records:
            if len(r) == HTTP_FIELDS:
                (fe, ip, port, backend, server, t0, t_head, t_queue, t_conn, t_resp, t_end,
                 status, bytes_out, term, actconn, feconn, beconn, srvconn, retries, queue,
                 method, url, version) = r
                start = t0 + offset
                if int(start) != day_second:
                    day_second = int(start)
                    day = _day(day_second)
                shown = methods.get(method)
                if shown is None:
                    # httptools knows a fixed list of methods: this stays small.
                    shown = methods[method] = escape(method) if method else "<BADREQ>"
                append('%s:%d [%s.%03d] %s %s/%s %d/%d/%d/%d/%d %d %d - - %s-- %d/%d/%d/%d/%d '
                       '0/%d "%s %s HTTP/%s"' % (
                           ip, port, day, (start - day_second) * 1000, fe, backend, server,
                           -1 if t_head < 0 else (t_head - t0) * 1000,
                           -1 if t_queue < 0 or t_head < 0 else (t_queue - t_head) * 1000,
                           -1 if t_conn < 0 or t_queue < 0 else (t_conn - t_queue) * 1000,
                           -1 if t_resp < 0 or t_conn < 0 else (t_resp - t_conn) * 1000,
                           (t_end - t0) * 1000, status or -1, bytes_out, term, actconn, feconn,
                           beconn, srvconn, retries, queue, shown,
                           escape(url) if needs_escape(url) else url.decode("ascii"),
                           version))
            else:
                (fe, ip, port, backend, server, accepted, t0, t_queue, t_conn, t_end,
                 bytes_out, term, actconn, feconn, beconn, srvconn, retries, queue) = r
                if int(accepted) != day_second:
                    day_second = int(accepted)
                    day = _day(day_second)
                append('%s:%d [%s.%03d] %s %s/%s %d/%d/%d %d %s %d/%d/%d/%d/%d 0/%d' % (
                    ip, port, day, (accepted - day_second) * 1000, fe, backend, server,
                    _ms(t_queue, t0), _ms(t_conn, t_queue), (t_end - t0) * 1000, bytes_out,
                    term, actconn, feconn, beconn, srvconn, retries, queue))
        self._day_second, self._day = day_second, day
        return lines

    def close(self) -> None:
        """Write what is left (the worker is leaving) and close the sink."""
        self.flush()
        self.sink.close()
