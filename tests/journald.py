"""journald's native protocol read back, for the tests of what hapymaster sends it.

Shared by tests/master (the daemon's log) and tests/worker (the access log's
journald sink); pyproject.toml puts tests/ on the tests' import path.
"""

from __future__ import annotations

import struct


def parse_journal(datagram: bytes) -> dict[str, str]:
    """The fields of one entry: KEY=value lines and binary (length-prefixed) fields."""
    fields = {}
    rest = datagram
    while rest:
        line, sep, after = rest.partition(b"\n")
        assert sep, rest
        if b"=" in line:
            key, _, value = line.partition(b"=")
            rest = after
        else:
            key = line
            (size,) = struct.unpack("<Q", after[:8])
            value = after[8:8 + size]
            assert after[8 + size:9 + size] == b"\n"
            rest = after[9 + size:]
        fields[key.decode()] = value.decode()
    return fields
