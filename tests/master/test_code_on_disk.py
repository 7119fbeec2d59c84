"""The master's cached view of the code on disk (``forkserver.CodeOnDisk``).

At every reload the master asks it whether the installed version changed
(then it re-executes itself) and whether the template's code is stale (then
the template is replaced). It answers from stats when nothing moved; these
tests check that every change an upgrade makes is still seen. In-process,
on a copy of a package in tmp_path placed first on sys.path.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from master_harness import install_metadata

from hapymaster import forkserver


def make_site(root: Path, version: str) -> Path:
    site = root / "site"
    package = site / "hapymaster"
    (package / "worker").mkdir(parents=True)
    (package / "__init__.py").write_text(f'__version__ = "{version}"\n')
    (package / "worker" / "h1.py").write_text("X = 1\n")
    install_metadata(site, version)
    return site


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    site = make_site(tmp_path, "1.0")
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    return site


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times the sources were read and hashed (the cache missed)."""
    calls = [0]
    real = forkserver.code_signature

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls[0] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(forkserver, "code_signature", counting)
    return calls


def test_nothing_changed_is_answered_from_stats(site: Path, hashed: list[int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver.CodeOnDisk, "RACY_NS", 0)   # the files are seconds old
    code = forkserver.CodeOnDisk()
    first = code.signature()
    assert first[0] == "1.0" and first[2] == str(site / "hapymaster")
    assert code.installed_version() == "1.0" and code.signature() == first
    assert hashed[0] == 1


def test_every_change_an_upgrade_makes_is_seen(site: Path, hashed: list[int],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver.CodeOnDisk, "RACY_NS", 0)
    code = forkserver.CodeOnDisk()
    seen = [code.signature()]

    # A new version's metadata (the package's files not even touched yet).
    install_metadata(site, "1.1")
    assert code.installed_version() == "1.1"
    seen.append(code.signature())
    # A source file rewritten, same size.
    (site / "hapymaster" / "worker" / "h1.py").write_text("X = 2\n")
    seen.append(code.signature())
    # A new module in a subpackage.
    (site / "hapymaster" / "worker" / "pool.py").write_text("")
    seen.append(code.signature())
    # A module removed.
    (site / "hapymaster" / "worker" / "h1.py").unlink()
    seen.append(code.signature())
    assert len(set(seen)) == len(seen), seen
    assert hashed[0] == len(seen)
    assert code.signature() == seen[-1] and hashed[0] == len(seen)


def test_the_package_installed_elsewhere_is_found(site: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forkserver.CodeOnDisk, "RACY_NS", 0)
    code = forkserver.CodeOnDisk()
    assert code.signature()[2] == str(site / "hapymaster")
    # A new install earlier on sys.path: its directory's status changes.
    other = make_site(tmp_path / "other", "2.0")
    sys.path.insert(0, str(other))
    assert code.signature()[:3:2] == ("2.0", str(other / "hapymaster"))


def test_files_younger_than_the_ctime_tick_are_never_trusted(site: Path,
                                                             hashed: list[int]) -> None:
    # Just written: a rewrite within the same ctime tick would keep its key.
    code = forkserver.CodeOnDisk()
    code.signature()
    code.signature()
    assert hashed[0] == 2


def spawn_request(server: forkserver.ForkServer, config: object, text: str) -> tuple[dict, bytes]:
    """The request and config bytes the master sends for one worker, read by a
    stand-in template on the other end of the socketpair."""
    import json
    import socket
    import threading
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    control, peer = socket.socketpair()
    server.sock = ours
    seen: dict = {}

    def template() -> None:
        data, fds, _, _ = socket.recv_fds(theirs, 65536, 16)
        with os.fdopen(fds[0], "rb") as memfd:
            memfd.seek(0)
            seen["config"] = memfd.read()
        for fd in fds[1:]:
            os.close(fd)
        seen["request"] = json.loads(data)
        theirs.send(json.dumps({"pids": [12345]}).encode())
    helper = threading.Thread(target=template)
    helper.start()
    try:
        assert server.spawn([control], [], os.getpid(), 7, [1], config, text) == [12345]
    finally:
        helper.join(5)
        for sock in (ours, theirs, control, peer):
            sock.close()
    return seen["request"], seen["config"]


def test_the_parsed_config_goes_only_to_a_template_of_the_masters_own_code() -> None:
    import pickle

    from hapymaster.config import EMBEDDED_CONFIG, parse_config
    config = parse_config(EMBEDDED_CONFIG, "<embedded>")
    server = forkserver.ForkServer()
    # The template started from the code this master runs: it gets the parse.
    server.signature = server.image
    request, data = spawn_request(server, config, EMBEDDED_CONFIG)
    assert request["config"] == "pickle" and pickle.loads(data) == config
    # Code changed on disk since the master started (no re-exec yet): the
    # template's classes may differ from the master's, so it parses the text.
    server.signature = ("0.0.1", *server.image[1:])
    request, data = spawn_request(server, config, EMBEDDED_CONFIG)
    assert request["config"] == "text" and data == EMBEDDED_CONFIG.encode()
    assert request["config_path"] == "<embedded>" and request["generation"] == 7
