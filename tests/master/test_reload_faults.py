"""A reload that cannot even read its config fails with the reason and touches nothing."""

from __future__ import annotations

import os

import pytest

from master_harness import free_port, http_config, http_get

def _removed(path) -> None:
    os.unlink(path)


def _a_directory(path) -> None:
    os.unlink(path)
    os.mkdir(path)


def _not_utf8(path) -> None:
    path.write_bytes(b"global:\n  workers: \xff\xfe\n")


@pytest.mark.parametrize("damage, reason", [
    (_removed, "cannot read the config: No such file or directory"),
    (_a_directory, "cannot read the config: Is a directory"),
    (_not_utf8, "the config is not valid UTF-8"),
])
def test_reload_with_an_unreadable_config_keeps_serving(master_factory, notify_socket,
                                                        http_backend, damage, reason):
    port = free_port()
    master = master_factory(http_config(port, [http_backend("a").address]))
    workers = master.workers()
    damage(master.config_path)
    mark = len(notify_socket.snapshot())
    answer = master.reload()
    assert answer.startswith("Success=0"), answer
    assert f"{master.config_path}:0: {reason}" in answer
    # systemd hears that the reload ended, and why
    ready = notify_socket.wait("READY", "1", after=mark)
    assert ready["STATUS"].startswith("Reload failed:")
    assert master.workers() == workers
    assert http_get(port)[0] == 200
    assert "[failed: 1]" in master.ctl("show proc")
