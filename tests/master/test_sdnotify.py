"""journald logging (hapymaster.sdnotify): structured entries by journald's
native protocol, read back from a datagram socket the test binds, without
systemd-python (a worker never imports it: issue 9, its RSS)."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import subprocess
import sys

import pytest

from hapymaster import sdnotify
from journald import parse_journal
from master_harness import ROOT


@pytest.fixture
def journal(tmp_path, monkeypatch):
    """A socket where journald's would be; the hapymaster loggers set up to log to it."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setattr(sdnotify, "JOURNAL_SOCKET", path)
    root = logging.getLogger("hapymaster")
    saved = (list(root.handlers), root.level, root.propagate)
    sdnotify.setup_logging("worker", 7, journal=True)
    yield sock
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved[0]:
        root.addHandler(handler)
    root.setLevel(saved[1])
    root.propagate = saved[2]
    sock.close()


def test_entries_carry_the_structured_fields(journal):
    logging.getLogger("hapymaster.worker").warning("backend %s is DOWN", "app")
    fields = parse_journal(journal.recv(65536))
    assert fields["MESSAGE"] == "backend app is DOWN"
    assert fields["PRIORITY"] == "4"
    assert fields["LOGGER"] == "hapymaster.worker"
    assert fields["SYSLOG_IDENTIFIER"] == "hapymaster"
    assert fields["HAPYMASTER_ROLE"] == "worker"
    assert fields["HAPYMASTER_PID"] == str(os.getpid())
    assert fields["HAPYMASTER_GENERATION"] == "7"
    assert fields["CODE_FILE"] == __file__ and fields["CODE_FUNC"] == (
        "test_entries_carry_the_structured_fields")
    assert int(fields["CODE_LINE"]) > 0


def test_a_traceback_is_a_binary_field(journal):
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("hapymaster.master").exception("it failed")
    fields = parse_journal(journal.recv(65536))
    assert fields["PRIORITY"] == "3"
    assert fields["MESSAGE"].startswith("it failed\nTraceback (most recent call last):")
    assert fields["EXCEPTION_TEXT"].endswith("ValueError: boom")


def test_an_entry_too_large_for_a_datagram_goes_in_a_sealed_memfd(journal):
    handler = logging.getLogger("hapymaster").handlers[0]
    big = "x" * (handler.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + 1024)
    logging.getLogger("hapymaster.worker").info("%s", big)
    data, fds, _, _ = socket.recv_fds(journal, 65536, 1)
    assert not data and len(fds) == 1, len(data)
    with os.fdopen(fds[0], "rb") as entry:
        entry.seek(0)   # journald maps it; the offset is where the writer left it
        fields = parse_journal(entry.read())
        # journald maps only a memfd nobody can write any more.
        seals = fcntl.fcntl(entry.fileno(), fcntl.F_GET_SEALS)
    assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SEAL
    assert fields["MESSAGE"] == big and fields["PRIORITY"] == "6"


def test_logging_sets_up_without_systemd_python(tmp_path):
    # The worker's side: journald logging, the access log, no systemd module.
    script = ("import sys\n"
              "from hapymaster import sdnotify\n"
              "import hapymaster.worker.accesslog\n"
              f"sdnotify.JOURNAL_SOCKET = {str(tmp_path)!r}\n"
              "sdnotify.setup_logging('worker', 1, journal=True)\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('systemd', 'yaml')))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
