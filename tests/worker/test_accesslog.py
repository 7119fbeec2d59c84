"""The access log (hapymaster.worker.accesslog): lines, batching, sinks, drops.

In-process first: the bytes the formatter makes for given values, one write
per loop iteration, drop counting on a full pipe or a journal socket nobody
reads, journald's datagram format and syslog's parsed back from sockets the
test owns. Then through a real worker: a request's entry arrives at the
test's journal socket with the structured fields, and a sink that takes
nothing does not stop the worker from serving (the drops are counted in
``show info``).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import socket
import struct
import time

import pytest

from hapymaster.config import AccessLogTarget, ConfigError, parse_config
from hapymaster.sdnotify import journal_field
from hapymaster.worker.accesslog import (BATCH_MAX, HTTP_FIELDS, TCP_FIELDS, AccessLog,
                                         JournalSink, Sink, StreamSink, SyslogSink, escape,
                                         worker_fields)
from journald import parse_journal
from worker_harness import http_config, http_get

F_SETPIPE_SZ = 1031
DATE = r"\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d\.\d{3}"


def dgram_queue_length() -> int:
    """How many datagrams a unix socket nobody reads holds (10 by default, 512 under systemd)."""
    try:
        with open("/proc/sys/net/unix/max_dgram_qlen") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return 512


class FixedLoop:
    """A loop whose clock the test sets, and whose call_soon the test runs."""

    def __init__(self, now: float = 1000.0):
        self.now = now
        self.soon: list = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback, *args) -> None:
        self.soon.append((callback, args))

    def run_soon(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


class ListSink(Sink):
    """Keeps each batch's lines; can be told to refuse them."""

    name = "list"

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.refuse = False

    def render(self, records, lines, wall):
        return list(lines)

    def send(self, lines):
        if self.refuse:
            return len(lines), OSError(11, "Resource temporarily unavailable")
        self.batches.append(lines)
        return 0, None


def http_record(t0: float = 1000.0, **change):
    """An http() record: 1 ms to the head, 2 ms connect, 5 ms to the response, 10 in all.

    Each interval is a whole number of ms and a half (truncated, as HAProxy
    counts whole ms): float rounding cannot move it across a boundary."""
    values = dict(fe="web", ip="192.0.2.7", port=40123, backend="app", server="s1", t0=t0,
                  t_head=t0 + 0.0015, t_queue=t0 + 0.0015, t_conn=t0 + 0.004,
                  t_resp=t0 + 0.0095, t_end=t0 + 0.0105, status=200, bytes_out=312, term="--",
                  actconn=4, feconn=3, beconn=2, srvconn=1, retries=0, queue=0,
                  method=b"GET", url=b"/small?x=1", version="1.1")
    values.update(change)
    return tuple(values.values())


def date_of(wall: float) -> str:
    return time.strftime("%d/%b/%Y:%H:%M:%S", time.localtime(int(wall))) + \
        ".%03d" % ((wall - int(wall)) * 1000)


# --- the line ----------------------------------------------------------------------


def test_httplog_line_for_given_values():
    loop = FixedLoop(1000.0)
    log = AccessLog(loop, ListSink())
    wall = 1764684900.25          # the flush's time.time(); the loop says 1000.0 then
    record = http_record(t0=999.5)
    assert len(record) == HTTP_FIELDS
    [line] = log.format([record], wall)
    # HAProxy's httplog; the date is the request's start: 0.5 s before the flush.
    assert line == (f"192.0.2.7:40123 [{date_of(wall - 0.5)}] web app/s1 1/0/2/5/10 200 312 "
                    f"- - ---- 4/3/2/1/0 0/0 \"GET /small?x=1 HTTP/1.1\"")


def test_httplog_line_without_server_or_request():
    log = AccessLog(FixedLoop(), ListSink())
    record = http_record(backend="web", server="<NOSRV>", t_head=-1.0, t_queue=-1.0,
                         t_conn=-1.0, t_resp=-1.0, status=400, term="CR", method=b"", url=b"",
                         beconn=0, srvconn=0)
    [line] = log.format([record], 1764684900.0)
    assert re.fullmatch(rf"192\.0\.2\.7:40123 \[{DATE}\] web web/<NOSRV> -1/-1/-1/-1/10 400 312 "
                        r'- - CR-- 4/3/0/0/0 0/0 "<BADREQ>  HTTP/1\.1"', line), line


def test_tcplog_line_for_given_values():
    log = AccessLog(FixedLoop(), ListSink())
    accepted = 1764684900.125
    record = ("db", "192.0.2.8", 5000, "pg", "p1", accepted, 10.0, 10.0015, 10.0045, 12.5005, 9000,
              "--", 2, 1, 1, 1, 0, 0)
    assert len(record) == TCP_FIELDS
    [line] = log.format([record], 1764684999.0)
    assert line == f"192.0.2.8:5000 [{date_of(accepted)}] db pg/p1 1/3/2500 9000 -- 2/1/1/1/0 0/0"


def test_url_and_method_escaped_as_haproxy_does():
    # Controls, DEL and up, '"' and '#' become #XX: one printable line whatever was sent.
    assert escape(b'/a b"c#d\x01\x7f\xff') == "/a b#22c#23d#01#7F#FF"
    assert escape(b"/plain/path?q=1&r=%20") == "/plain/path?q=1&r=%20"
    log = AccessLog(FixedLoop(), ListSink())
    [line] = log.format([http_record(url=b'/x"\n', method=b"G\x00T")], 1764684900.0)
    assert line.endswith('"G#00T /x#22#0A HTTP/1.1"')


def test_no_header_value_or_body_reaches_the_line():
    # The record carries no headers or body at all: what the line can show is
    # the request line only; Authorization and Cookie never get there.
    log = AccessLog(FixedLoop(), ListSink())
    [line] = log.format([http_record()], 1764684900.0)
    assert "Authorization" not in line and "Cookie" not in line


# --- batching ----------------------------------------------------------------------


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_one_write_per_loop_iteration(kind):
    sink = ListSink()
    loop = new_loop(kind)
    try:
        log = AccessLog(loop, sink)

        def three() -> None:
            for _ in range(3):
                log.http(*http_record(t0=loop.time()))
            assert sink.batches == []          # nothing written during the iteration

        loop.call_soon(three)
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        assert [len(batch) for batch in sink.batches] == [3]
        loop.call_soon(lambda: log.http(*http_record(t0=loop.time())))
        loop.run_until_complete(asyncio.sleep(0))
        loop.run_until_complete(asyncio.sleep(0))
        assert [len(batch) for batch in sink.batches] == [3, 1]
    finally:
        loop.close()


def test_a_full_batch_is_written_at_once():
    sink = ListSink()
    loop = FixedLoop()
    log = AccessLog(loop, sink)
    for _ in range(BATCH_MAX + 5):
        log.http(*http_record())
    assert [len(batch) for batch in sink.batches] == [BATCH_MAX]
    assert len(loop.soon) == 1                 # one flush armed, not one per record
    loop.run_soon()
    assert [len(batch) for batch in sink.batches] == [BATCH_MAX, 5]


def test_close_writes_what_is_left():
    sink = ListSink()
    log = AccessLog(FixedLoop(), sink)
    log.http(*http_record())
    log.close()
    assert [len(batch) for batch in sink.batches] == [1]


# --- drops -------------------------------------------------------------------------


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def warnings():
    handler = Captured()
    logger = logging.getLogger("hapymaster.worker")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_refused_lines_are_counted_and_said_once(warnings):
    sink = ListSink()
    loop = FixedLoop()
    log = AccessLog(loop, sink)
    sink.refuse = True
    for _ in range(3):
        for _ in range(4):
            log.http(*http_record())
        loop.run_soon()
    assert log.dropped == 12
    assert len(warnings) == 1 and "dropping" in warnings[0]
    sink.refuse = False
    log.http(*http_record())
    loop.run_soon()
    assert log.dropped == 12 and len(sink.batches) == 1
    assert len(warnings) == 2 and "12 line(s) dropped" in warnings[1]


def nonblocking_pipe(size: int = 4096) -> tuple[int, int]:
    reader, writer = os.pipe()
    fcntl.fcntl(writer, F_SETPIPE_SZ, size)
    os.set_blocking(writer, False)
    return reader, writer


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_full_pipe_drops_whole_lines_and_never_blocks(warnings):
    reader, writer = nonblocking_pipe()
    loop = FixedLoop()
    log = AccessLog(loop, StreamSink(writer, "pipe", "worker[gen 3]"))
    try:
        sent = 0
        started = time.monotonic()
        while log.dropped == 0:
            for _ in range(5):
                log.http(*http_record(url=b"/n%d" % sent))
                sent += 1
            loop.run_soon()
            assert sent < 1000
        assert time.monotonic() - started < 5     # it did not wait for the reader
        for _ in range(20):                        # the pipe stays full: all dropped
            log.http(*http_record(url=b"/late"))
        loop.run_soon()
        assert "dropping" in warnings[0]
        got = read_all(reader)
        # Drained: the next batch goes through, after the rest of the line
        # a partial write had cut.
        log.http(*http_record(url=b"/after"))
        loop.run_soon()
        got += read_all(reader)
        lines = got.decode().splitlines()
        pattern = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d hapymaster\[\d+\] worker\[gen 3\] "
                             r"info: 192\.0\.2\.7:40123 \[.*\] web app/s1 .* \"GET /(n\d+|after) "
                             r"HTTP/1\.1\"")
        for line in lines:
            assert pattern.fullmatch(line), line
        assert lines[-1].endswith('"GET /after HTTP/1.1"')
        assert len(lines) + log.dropped == sent + 21
        assert "dropped meanwhile" in warnings[-1]
    finally:
        os.close(reader)
        os.close(writer)


# --- journald --------------------------------------------------------------------


@pytest.fixture
def dgram_socket(tmp_path):
    path = str(tmp_path / "log.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield sock, path
    sock.close()


def test_journal_datagram_fields(dgram_socket):
    sock, path = dgram_socket
    sink = JournalSink(path, worker_fields(7))
    log = AccessLog(FixedLoop(), sink)
    log.http(*http_record(status=503, server="s2"))
    log.tcp("db", "192.0.2.9", 5000, "pg", "p1", 1764684900.0, 10.0, 10.0, 10.001, 11.0, 10,
            "--", 1, 1, 1, 1, 0, 0)
    log.flush()
    first = parse_journal(sock.recv(65536))
    second = parse_journal(sock.recv(65536))
    assert first.pop("MESSAGE").startswith("192.0.2.7:40123 [")
    assert first == {"PRIORITY": "6", "SYSLOG_IDENTIFIER": "hapymaster",
                     "LOGGER": "hapymaster.access", "HAPYMASTER_ROLE": "worker",
                     "HAPYMASTER_PID": str(os.getpid()), "HAPYMASTER_GENERATION": "7",
                     "HAPYMASTER_FRONTEND": "web", "HAPYMASTER_BACKEND": "app",
                     "HAPYMASTER_SERVER": "s2", "HAPYMASTER_STATUS": "503",
                     "HAPYMASTER_CLIENT": "192.0.2.7"}
    assert second["MESSAGE"].startswith("192.0.2.9:5000 [") and "HAPYMASTER_STATUS" not in second
    assert second["HAPYMASTER_FRONTEND"] == "db" and second["HAPYMASTER_SERVER"] == "p1"
    sink.close()


def test_journal_binary_field_for_a_newline():
    assert journal_field(b"A", b"one line") == b"A=one line\n"
    field = journal_field(b"MESSAGE", b"two\nlines")
    assert field == b"MESSAGE\n" + struct.pack("<Q", 9) + b"two\nlines\n"
    assert parse_journal(field + b"B=c\n") == {"MESSAGE": "two\nlines", "B": "c"}


def test_journal_nobody_reading_drops_and_counts(dgram_socket, warnings):
    sock, path = dgram_socket
    loop = FixedLoop()
    log = AccessLog(loop, JournalSink(path, worker_fields(1)))
    # Nobody reads: the kernel queues net.unix.max_dgram_qlen datagrams at most.
    batches = dgram_queue_length() // 100 + 3
    for _ in range(batches):
        for _ in range(100):
            log.http(*http_record())
        loop.run_soon()
    assert 0 < log.dropped < batches * 100
    assert len(warnings) == 1
    queued = 0
    sock.settimeout(0)
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            break
        queued += 1
    assert queued + log.dropped == batches * 100


# --- syslog ------------------------------------------------------------------------


def test_syslog_rfc3164_to_a_unix_socket(dgram_socket):
    sock, path = dgram_socket
    log = AccessLog(FixedLoop(), SyslogSink(path, "local0", "rfc3164"))
    log.http(*http_record())
    log.flush()
    text = sock.recv(65536).decode()
    # local0 (16) * 8 + info (6) = 134; "Dec  2": the day is padded with a space.
    assert re.fullmatch(rf"<134>\w{{3}} [ \d]\d \d\d:\d\d:\d\d hapymaster\[{os.getpid()}\]: "
                        r"192\.0\.2\.7:40123 \[.*\] web app/s1 .*\"GET /small\?x=1 HTTP/1\.1\"",
                        text), text


def test_syslog_rfc5424_over_udp():
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    try:
        port = receiver.getsockname()[1]
        log = AccessLog(FixedLoop(), SyslogSink(f"127.0.0.1:{port}", "local7", "rfc5424"))
        log.http(*http_record())
        log.flush()
        text = receiver.recv(65536).decode()
        assert re.fullmatch(rf"<190>1 \d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{6}}[+-]\d\d:\d\d "
                            rf"\S+ hapymaster {os.getpid()} - - 192\.0\.2\.7:40123 .*", text), text
    finally:
        receiver.close()


# --- config ------------------------------------------------------------------------

FRONT = """
frontends:
  - name: web
    bind: ["127.0.0.1:8080"]
    default_backend: app
backends:
  - name: app
    servers: [{name: a, address: "127.0.0.1:9001"}]
"""


def test_config_access_log_target():
    config = parse_config("global:\n  access_log: {target: syslog, address: \"127.0.0.1:514\","
                          " facility: local3, format: rfc5424}\n" + FRONT, "t.yaml")
    target = config.global_.access_log
    assert (target.target, target.address, target.facility, target.format) == \
        ("syslog", "127.0.0.1:514", "local3", "rfc5424")
    assert str(target.where) == "t.yaml:2"
    assert parse_config(FRONT, "t.yaml").global_.access_log == AccessLogTarget()
    config = parse_config("global:\n  access_log: {target: file, address: /var/log/h.log}\n" + FRONT,
                          "t.yaml")
    assert config.global_.access_log.address == "/var/log/h.log"


@pytest.mark.parametrize("text, message", [
    ("{target: kafka}", "t.yaml:3: global.access_log.target: expected one of journal, stderr, "
                        "file, syslog, got 'kafka'"),
    ("{target: file}", "t.yaml:3: global.access_log: target file needs 'address'"),
    ("{target: journal, facility: local0}", "t.yaml:3: global.access_log.facility applies to "
                                            "target syslog only"),
    ("{target: stderr, address: /x}", "t.yaml:3: global.access_log.address: target stderr "
                                      "takes none"),
    ("{target: file, address: relative.log}", "t.yaml:3: global.access_log.address: expected an "
                                              "absolute path, got 'relative.log'"),
    ("{target: syslog, facility: local9}", "t.yaml:3: global.access_log.facility: expected one of"),
    ("{target: syslog, level: info}", "t.yaml:3: unknown key 'level' in global.access_log"),
    ("{address: /dev/log}", "t.yaml:3: global.access_log needs 'target'"),
])
def test_config_access_log_errors(text, message):
    with pytest.raises(ConfigError) as info:
        parse_config(f"global:\n  workers: 1\n  access_log: {text}\n" + FRONT, "t.yaml")
    assert any(error.startswith(message) for error in info.value.errors), info.value.errors


# --- through a real worker -----------------------------------------------------------


def test_worker_sends_journal_entries_with_fields(backend, bind, run_worker, dgram_socket):
    sock, path = dgram_socket
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global=f"  access_log: {{target: journal, "
                                                 f"address: \"{path}\"}}"))
    assert http_get(front, "/journal?q=1", headers={"Authorization": "Basic c2VjcmV0",
                                                    "Cookie": "session=secret"})[0] == 200
    datagram = sock.recv(65536)
    fields = parse_journal(datagram)
    assert re.fullmatch(rf"127\.0\.0\.1:\d+ \[{DATE}\] web app/a \d+/\d+/\d+/\d+/\d+ 200 \d+ - - "
                        r'---- \d+/\d+/\d+/\d+/0 0/0 "GET /journal\?q=1 HTTP/1\.1"',
                        fields["MESSAGE"]), fields["MESSAGE"]
    assert fields["HAPYMASTER_PID"] == str(worker.proc.pid)
    assert (fields["HAPYMASTER_ROLE"], fields["HAPYMASTER_GENERATION"]) == ("worker", "1")
    assert (fields["HAPYMASTER_FRONTEND"], fields["HAPYMASTER_BACKEND"],
            fields["HAPYMASTER_SERVER"], fields["HAPYMASTER_STATUS"],
            fields["HAPYMASTER_CLIENT"]) == ("web", "app", "a", "200", "127.0.0.1")
    assert fields["SYSLOG_IDENTIFIER"] == "hapymaster" and fields["PRIORITY"] == "6"
    assert b"secret" not in datagram and b"c2VjcmV0" not in datagram
    assert "/journal" not in worker.log       # the entry went to the journal, not stderr


def test_worker_keeps_serving_when_the_log_sink_takes_nothing(backend, bind, run_worker,
                                                              dgram_socket):
    sock, path = dgram_socket        # bound, never read: the journal is stuck
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global=f"  access_log: {{target: journal, "
                                                 f"address: \"{path}\"}}"))
    host, port = front.rsplit(":", 1)
    count = dgram_queue_length() + 50
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        reader = conn.makefile("rb")
        for i in range(count):
            conn.sendall(b"GET /n%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            status = reader.readline()
            assert status.startswith(b"HTTP/1.1 200"), status
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            reader.read(length)
    info = dict(line.split(": ", 1) for line in worker.cli("show info").splitlines() if line)
    dropped = int(info["DroppedLogs"])
    assert 0 < dropped <= count
    assert worker.log.count("does not take lines") == 1
    queued = 0
    sock.settimeout(0)
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            break
        queued += 1
    assert queued + dropped == count
    # The journal reads again: the next line goes through, and the summary is logged.
    assert http_get(front, "/again")[0] == 200
    sock.settimeout(5)
    assert "/again" in parse_journal(sock.recv(65536))["MESSAGE"]
    deadline = time.monotonic() + 5
    while f"{dropped} line(s) dropped meanwhile" not in worker.log:
        assert time.monotonic() < deadline, worker.log
        time.sleep(0.05)


def test_worker_file_target_gets_http_and_tcp_lines(backend, tcp_backend, bind, run_worker,
                                                    tmp_path):
    a = backend("a")
    echo = tcp_backend("e")
    front, tcp_front = bind("web"), bind("tcp")
    path = tmp_path / "access.log"
    text = http_config(front, [("a", a.address)],
                       extra_global=f"  access_log: {{target: file, address: \"{path}\"}}")
    text += (f"  - name: echo\n    mode: tcp\n    servers:\n"
             f"      - {{name: e1, address: \"{echo.address}\"}}\n")
    text = text.replace("backends:\n", f"  - name: raw\n    mode: tcp\n    bind: [\"{tcp_front}\"]\n"
                                       f"    default_backend: echo\nbackends:\n")
    run_worker(text)
    assert http_get(front, "/to-file")[0] == 200
    host, port = tcp_front.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        assert conn.recv(100).startswith(b"hello from e")
    deadline = time.monotonic() + 5
    while True:
        content = path.read_text() if path.exists() else ""
        if "/to-file" in content and " raw echo/e1 " in content:
            break
        assert time.monotonic() < deadline, content
        time.sleep(0.05)
    http_line, tcp_line = sorted(content.splitlines(), key=lambda line: " raw " in line)
    assert re.search(r'\] web app/a .* 200 .*"GET /to-file HTTP/1\.1"$', http_line), http_line
    assert re.search(rf"127\.0\.0\.1:\d+ \[{DATE}\] raw echo/e1 \d+/\d+/\d+ \d+ -- ", tcp_line), \
        tcp_line


def test_pipe_batches_are_cut_at_line_ends_under_pipe_buf(monkeypatch):
    # Several workers share one stderr pipe: a write up to PIPE_BUF is never
    # interleaved with theirs, so a big batch goes as several such writes.
    from hapymaster.worker import accesslog
    reader, writer = os.pipe()
    os.set_blocking(writer, False)
    writes: list[bytes] = []
    real_write = os.write

    def spy(fd, data):
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(accesslog.os, "write", spy)
    log = AccessLog(FixedLoop(), StreamSink(writer, "pipe", "worker"))
    try:
        for i in range(100):
            log.http(*http_record(url=b"/%d" % i))
        log.flush()
        assert len(writes) > 1 and log.dropped == 0
        assert all(len(w) <= accesslog.PIPE_BUF and w.endswith(b"\n") for w in writes)
        assert read_all(reader).count(b"\n") == 100
    finally:
        os.close(reader)
        os.close(writer)


def test_stderr_target_never_blocks_and_leaves_fd_2_alone(tmp_path):
    # A process whose stderr is a small pipe nobody reads: lines are dropped,
    # the warning about it (logging, as a worker sets it up) does not wait
    # either, and fd 2 itself stays blocking for everything else that writes
    # to it (the master shares that open file).
    import subprocess
    import sys
    script = (
        "import os, sys\n"
        "from hapymaster.config import AccessLogTarget\n"
        "from hapymaster.sdnotify import setup_logging\n"
        "from hapymaster.worker.accesslog import AccessLog, open_sink\n"
        "setup_logging('worker', 2)\n"
        "class Loop:\n"
        "    def time(self): return 1000.0\n"
        "    def call_soon(self, cb): pass\n"
        "log = AccessLog(Loop(), open_sink(AccessLogTarget(target='stderr'), 2))\n"
        "for i in range(400):\n"
        "    log.http('web', '192.0.2.1', 1, 'app', 's1', 1000.0, 1000.0, 1000.0, 1000.0,\n"
        "             1000.0, 1000.0, 200, 10, '--', 1, 1, 1, 1, 0, 0, b'GET', b'/x', '1.1')\n"
        "    log.flush()\n"
        "print(log.dropped, os.get_blocking(2), flush=True)\n")
    reader, writer = os.pipe()
    fcntl.fcntl(writer, F_SETPIPE_SZ, 4096)
    try:
        proc = subprocess.run([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=writer, timeout=30, cwd=os.path.dirname(os.path.dirname(
                                  os.path.dirname(os.path.abspath(__file__)))))
    finally:
        os.close(writer)
    try:
        dropped, blocking = proc.stdout.decode().split()
        assert int(dropped) > 300 and blocking == "True", proc.stdout
        assert b"worker[gen 2] info: 192.0.2.1:1 [" in os.read(reader, 4096)
    finally:
        os.close(reader)


def test_file_target_reopens_a_file_renamed_away(tmp_path):
    # logrotate's default: rename the file, expect the writer to create it again.
    from hapymaster.worker.accesslog import open_sink
    path = tmp_path / "access.log"
    log = AccessLog(FixedLoop(), open_sink(AccessLogTarget(target="file", address=str(path)), 1))
    try:
        log.http(*http_record(url=b"/before"))
        log.flush()
        os.rename(path, tmp_path / "access.log.1")
        time.sleep(1.1)                 # the path is looked at once a second
        log.http(*http_record(url=b"/after"))
        log.flush()
        assert "/before" in (tmp_path / "access.log.1").read_text()
        assert "/after" in path.read_text() and "/before" not in path.read_text()
        assert log.dropped == 0
    finally:
        log.close()


def test_a_full_disk_drops_lines_and_keeps_serving(backend, bind, run_worker):
    """/dev/full: every write fails with ENOSPC, as on a full disk."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    a = backend("a")
    front = bind("web")
    worker = run_worker(http_config(front, [("a", a.address)],
                                    extra_global='  access_log: {target: file, address: "/dev/full"}'))
    for _ in range(20):
        assert http_get(front)[0] == 200
    deadline = time.monotonic() + 5
    while True:
        dropped = int(re.search(r"DroppedLogs: (\d+)", worker.cli("show info")).group(1))
        if dropped >= 20:
            break
        assert time.monotonic() < deadline, worker.cli("show info")
        time.sleep(0.05)
    assert dropped == 20
    # Said once, not per line.
    assert worker.log.count("No space left on device") == 1, worker.log
