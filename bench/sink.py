#!/usr/bin/env python3
"""A syslog sink for the bench: binds a unix datagram socket, counts and discards.

HAProxy's ``log /path local0`` sends one datagram per line here. The bench
runs it pinned to the load core. SIGUSR1 prints ``<datagrams> <bytes>`` on
stdout (the bench reads it before and after a run); SIGTERM exits.
"""

import os
import signal
import socket
import sys

path = sys.argv[1]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
try:
    # Root may go past rmem_max: a deep queue, so that a burst is not dropped
    # by the kernel because this reader was descheduled for a moment.
    sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)   # SO_RCVBUFFORCE
except OSError:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
sock.bind(path)
os.chmod(path, 0o666)
count = size = 0


def report(*_):
    print(count, size, flush=True)


signal.signal(signal.SIGUSR1, report)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
buf = bytearray(65536)
while True:
    n = sock.recv_into(buf)
    count += 1
    size += n
