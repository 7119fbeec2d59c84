"""Zero-copy relay between two sockets: socket -> pipe -> socket with splice(2).

A uvloop transport copies every byte through user space twice (recv into a
new bytes object, send from it). Once a TCP session carries bulk data,
``proxy_tcp`` hands its two sockets to a ``Splice``: the kernel moves the
pages from one socket to a pipe and from the pipe to the other socket,
Python only says when. This is HAProxy's ``option splice-auto``.

uvloop transports own their descriptors (``add_reader`` refuses a
transport's fd), so the relay works on duplicates of them (``os.dup``: the
same socket, another descriptor) while both transports are paused and their
write buffers empty; the transports are closed when the session ends.

The duplicates are watched by one epoll instance of our own (``Poller``),
itself watched by the loop as one descriptor, not by ``loop.add_reader``:
libuv answers EPOLLERR (a reset) on a watched descriptor by stopping the
watcher without calling it (uvloop then only logs the error), so a server
that resets mid-transfer would leave the session hanging.

Each direction is a ``Pump`` with its own pipe. It reads its source only
while its pipe is empty: a destination that does not take the bytes stops
the reading of the source (backpressure, as ``pause_reading`` does), and it
waits for the destination to be writable only while bytes wait in the pipe.
An end of stream on a source is passed on as ``shutdown(SHUT_WR)`` once the
pipe is empty (half-close); the session ends when both directions have
ended, or at the first error, and the owner (``proxy_tcp.TcpClient``) is
told through ``spliced``, ``splice_done`` and ``splice_failed``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import socket
import sys
import weakref
from typing import Callable, Protocol

AVAILABLE = hasattr(os, "splice") and sys.platform.startswith("linux")

# The pipe of each direction. Bigger than the 64 KiB default so one wake-up
# moves what a loopback socket can hold; the kernel keeps the default when
# the user is over fs.pipe-user-pages-soft (then it is only slower).
PIPE_SIZE = 262144
_FLAGS = (os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK) if AVAILABLE else 0
_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)

_IN = select.EPOLLIN | select.EPOLLRDHUP
_OUT = select.EPOLLOUT
_BROKEN = select.EPOLLERR | select.EPOLLHUP


class Poller:
    """One epoll instance for every spliced socket of a loop, watched by the loop as one fd.

    Level-triggered, as the loop's own. A handler gets the event mask of its
    descriptor; errors and hang-ups are reported whatever the mask.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.ep = select.epoll()
        self.handlers: dict[int, Callable[[int], None]] = {}
        loop.add_reader(self.ep.fileno(), self.ready)

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self.handlers[fd] = handler
        self.ep.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        if self.handlers.pop(fd, None) is not None:
            self.ep.unregister(fd)

    def ready(self) -> None:
        handlers = self.handlers
        for fd, events in self.ep.poll(0, 256):
            handler = handlers.get(fd)
            if handler is not None:  # None: unregistered by an earlier handler of this pass
                handler(events)


_pollers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Poller]" = (
    weakref.WeakKeyDictionary())


def poller(loop: asyncio.AbstractEventLoop) -> Poller:
    """The loop's Poller, made on first use (a worker without TCP bulk never has one)."""
    found = _pollers.get(loop)
    if found is None:
        found = _pollers[loop] = Poller(loop)
    return found


class Owner(Protocol):
    def spliced(self, n: int, outbound: bool) -> None: ...
    def splice_done(self) -> None: ...
    def splice_failed(self, exc: OSError) -> None: ...


class Pump:
    """One direction: ``src`` -> pipe -> ``dst``. ``reading``/``writing``: what it waits for."""

    __slots__ = ("relay", "src", "dst", "dst_sock", "rp", "wp", "queued", "eof", "done",
                 "reading", "writing", "outbound")

    def __init__(self, relay: "Splice", src: socket.socket, dst: socket.socket, outbound: bool,
                 done: bool):
        self.relay = relay
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.outbound = outbound     # server -> client (bytes_out)
        self.rp = self.wp = -1
        self.queued = 0              # bytes in the pipe, not yet in dst
        self.eof = False             # src ended: shut dst's sending side once the pipe is empty
        self.done = done
        self.reading = not done
        self.writing = False

    def open(self) -> None:
        self.rp, self.wp = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(self.wp, _SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass

    def readable(self) -> None:
        # Called only while the pipe is empty, so EAGAIN here is a spurious
        # wake-up, never a full pipe.
        try:
            n = os.splice(self.src, self.wp, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.failed(exc)
            return
        if n == 0:
            self.eof = True
        else:
            self.queued += n
            self.relay.owner.spliced(n, self.outbound)
        self.flush()

    def flush(self) -> None:
        try:
            while self.queued:
                self.queued -= os.splice(self.rp, self.dst, self.queued, flags=_FLAGS)
        except BlockingIOError:
            pass
        except OSError as exc:
            self.relay.failed(exc)
            return
        relay = self.relay
        if self.queued:
            if self.reading or not self.writing:
                self.reading, self.writing = False, True
                relay.update()
            return
        if self.eof:
            self.reading = self.writing = False
            self.done = True
            relay.update()
            try:
                self.dst_sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass                 # the peer is gone: the other direction will say so
            relay.ended()
        elif self.writing or not self.reading:
            self.reading, self.writing = True, False
            relay.update()

    def close_pipe(self) -> None:
        self.reading = self.writing = False
        for fd in (self.rp, self.wp):
            if fd >= 0:
                os.close(fd)
        self.rp = self.wp = -1


class Splice:
    """Both directions of a session between the sockets ``client`` and ``server``.

    ``client_done``: the client already ended its side (its end of stream was
    passed on before the switch), so only server -> client is relayed.
    """

    __slots__ = ("poller", "owner", "socks", "up", "down", "closed", "cfd", "sfd", "masks")

    def __init__(self, loop: asyncio.AbstractEventLoop, owner: Owner, client: socket.socket,
                 server: socket.socket, client_done: bool):
        self.poller = poller(loop)
        self.owner = owner
        self.closed = False
        self.cfd = self.sfd = -1
        self.masks = (0, 0)          # watched now on the client's and the server's socket
        self.socks: list[socket.socket] = []
        self.up: Pump | None = None
        self.down: Pump | None = None
        try:
            # socket objects over duplicates: the same sockets, descriptors of our own
            csock = socket.socket(fileno=os.dup(client.fileno()))
            self.socks.append(csock)
            ssock = socket.socket(fileno=os.dup(server.fileno()))
            self.socks.append(ssock)
            self.down = Pump(self, ssock, csock, True, False)
            self.up = Pump(self, csock, ssock, False, client_done)
            self.down.open()
            if not client_done:
                self.up.open()
        except OSError:
            self.close()
            raise

    def start(self) -> None:
        csock, ssock = self.socks
        self.masks = self.wanted()
        self.cfd, self.sfd = csock.fileno(), ssock.fileno()
        self.poller.register(self.cfd, self.masks[0], self.client_event)
        self.poller.register(self.sfd, self.masks[1], self.server_event)

    def wanted(self) -> tuple[int, int]:
        up, down = self.up, self.down
        assert up is not None and down is not None
        return ((_IN if up.reading else 0) | (_OUT if down.writing else 0),
                (_IN if down.reading else 0) | (_OUT if up.writing else 0))

    def update(self) -> None:
        """A pump changed what it waits for: watch that, no more."""
        if self.closed or self.cfd < 0:
            return
        masks = self.wanted()
        if masks[0] != self.masks[0]:
            self.poller.modify(self.cfd, masks[0])
        if masks[1] != self.masks[1]:
            self.poller.modify(self.sfd, masks[1])
        self.masks = masks

    def client_event(self, events: int) -> None:
        self._event(events, self.up, self.down, 0)

    def server_event(self, events: int) -> None:
        self._event(events, self.down, self.up, 1)

    def _event(self, events: int, reader: Pump | None, writer: Pump | None, side: int) -> None:
        """``reader`` reads this socket, ``writer`` writes to it."""
        assert reader is not None and writer is not None
        acted = False
        if reader.reading and events & (_IN | _BROKEN):
            reader.readable()        # the data first, then the reset or the end
            acted = True
        if not self.closed and writer.writing and events & (_OUT | _BROKEN):
            writer.flush()           # writes, or meets the error
            acted = True
        if not acted and events & _BROKEN and not self.closed:
            # Nobody waits on this socket and it broke (a reset while the
            # other direction waits elsewhere): the session cannot go on,
            # and level-triggered, it would be reported at every pass.
            code = self.socks[side].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.failed(OSError(code, os.strerror(code)) if code else
                        ConnectionResetError("the peer hung up"))

    def ended(self) -> None:
        if self.up is not None and self.up.done and self.down is not None and self.down.done:
            self.owner.splice_done()

    def failed(self, exc: OSError) -> None:
        if not self.closed:
            self.owner.splice_failed(exc)

    def close(self) -> None:
        """Stop watching, close the pipes and the duplicate descriptors (idempotent)."""
        if self.closed:
            return
        self.closed = True
        for fd in (self.cfd, self.sfd):
            if fd >= 0:
                self.poller.unregister(fd)
        for pump in (self.up, self.down):
            if pump is not None:
                pump.close_pipe()
        for sock in self.socks:
            sock.close()
        self.socks = []
