"""The listening sockets: bound here, passed by systemd (socket activation),
or kept in systemd's fd store across restarts and crashes.

The master holds one listening socket per ``bind`` address (``Master.listeners``);
this module says where each comes from.

- Socket activation: started by a ``.socket`` unit, the master gets its
  sockets as fds 3.. with ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``.
  A passed socket belongs to the ``bind`` address it is bound to, or, by its
  ``FileDescriptorName=``, to the frontend of that name (``stats``: the stats
  page), where it stands in for that frontend's binds no passed socket
  matched by address, in order. A passed socket that belongs to nothing fails
  the start: systemd would keep accepting clients on it that no one serves.
- FD store: with ``FDSTORE`` in the environment (systemd >= 254 sets it from
  ``FileDescriptorStoreMax=``; on 252 the unit sets it), every socket the
  master binds is also handed to systemd (``FDSTORE=1``, ``FDNAME=hapy-…``).
  systemd keeps it open when the master exits or crashes, so clients wait in
  the backlog instead of being refused, and passes it back, by that name, to
  the next master in ``LISTEN_FDS``. A stored socket the config no longer
  binds is closed and removed from the store.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from .config import Address, Config, Where
from .sdnotify import notify

log = logging.getLogger("hapymaster.master")

LISTEN_BACKLOG = 1024
SD_LISTEN_FDS_START = 3
# Names the master gives the sockets it stores; a socket unit's own names
# (FileDescriptorName=, default: the unit's name) never start with it.
STORE_PREFIX = "hapy-"
STATS_NAME = "stats"


class SocketError(Exception):
    """systemd passed sockets the master cannot use: the start fails with these lines."""

    def __init__(self, errors: list[str]):
        super().__init__(errors[0])
        self.errors = errors


def bind_listener(address: Address) -> socket.socket:
    family, kind, proto, sockaddr = _resolve(address)
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _resolve(address: Address) -> tuple[int, int, int, tuple[str, int]]:
    infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                               flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    return family, kind, proto, sockaddr


def store_name(address: Address) -> str:
    """The FDNAME of ``address`` in the fd store: unique, and without ':' (systemd forbids it)."""
    return STORE_PREFIX + str(address).replace(":", "-")


@dataclass(frozen=True)
class Bind:
    """One listening address the config wants, and who wants it."""
    address: Address
    owner: str        # the frontend's name, or "stats"
    where: Where


def config_binds(config: Config) -> list[Bind]:
    binds = [Bind(address, frontend.name, frontend.where)
             for frontend in config.frontends for address in frontend.bind]
    if config.global_.stats is not None:
        binds.append(Bind(config.global_.stats.bind, STATS_NAME, config.global_.stats.where))
    return binds


@dataclass
class Passed:
    """A socket systemd passed at start: from a socket unit, or back from the fd store."""
    sock: socket.socket
    name: str

    @property
    def stored(self) -> bool:
        return self.name.startswith(STORE_PREFIX)

    def sockname(self) -> tuple[int, str, int]:
        host, port = self.sock.getsockname()[:2]
        return self.sock.family, host, port

    def describe(self) -> str:
        _, host, port = self.sockname()
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return f"{shown} (FileDescriptorName={self.name})"


def passed_sockets() -> list[Passed]:
    """The sockets systemd passed this process (fds 3..), as sd_listen_fds_with_names reads them.

    The LISTEN_* variables are removed from the environment whatever they
    say: they describe this process alone, and no child must act on them.
    Raises SocketError when one is not a listening TCP socket.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    count = os.environ.pop("LISTEN_FDS", "")
    names_text = os.environ.pop("LISTEN_FDNAMES", "")
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    names = names_text.split(":") if names_text else []
    passed, errors = [], []
    for index in range(int(count)):
        fd = SD_LISTEN_FDS_START + index
        name = names[index] if index < len(names) and names[index] else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            errors.append(f"systemd passed fd {fd} (FileDescriptorName={name}), "
                          f"which is not a socket: {exc.strerror}")
            continue
        sock.set_inheritable(False)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if sock.family not in (socket.AF_INET, socket.AF_INET6) or \
                sock.type != socket.SOCK_STREAM or not listening:
            errors.append(f"systemd passed fd {fd} (FileDescriptorName={name}), which is not "
                          f"a listening TCP socket: use ListenStream= with an IP address "
                          f"or a port")
            sock.close()
            continue
        sock.setblocking(False)
        passed.append(Passed(sock, name))
    if errors:
        for item in passed:
            item.sock.close()
        raise SocketError(errors)
    return passed


def match_passed(passed: list[Passed], config: Config) -> tuple[dict[Address, Passed],
                                                                 list[Passed]]:
    """Which bind address each passed socket serves; and the stored ones nobody wants.

    First by address (the one bind_listener would bind), then by name: a
    socket named after a frontend takes that frontend's first bind not
    matched yet (so ``ListenStream=80`` on a dual-stack [::]:80 socket can
    serve ``bind: ["*:80"]``). Raises SocketError for a socket-unit socket
    that matches nothing; closes nothing.
    """
    binds = config_binds(config)
    wanted: dict[tuple[int, str, int], Bind] = {}
    for bind in binds:
        try:
            family, _, _, sockaddr = _resolve(bind.address)
        except OSError:
            continue   # a host that does not resolve: bind_listener says so, with the address
        wanted.setdefault((family, sockaddr[0], sockaddr[1]), bind)
    matched: dict[Address, Passed] = {}
    by_name: list[Passed] = []
    stale: list[Passed] = []
    # Socket-unit sockets first: when the store holds a copy of the same
    # address too, the socket unit's (which systemd keeps anyway) is used.
    for item in sorted(passed, key=lambda p: p.stored):
        bind = wanted.get(item.sockname())
        if bind is not None and bind.address not in matched:
            matched[bind.address] = item
        elif item.stored:
            stale.append(item)
        else:
            by_name.append(item)
    errors = []
    for item in by_name:
        bind = next((b for b in binds if b.owner == item.name and b.address not in matched),
                    None)
        if bind is not None:
            matched[bind.address] = item
            continue
        owner = next((b for b in binds if b.owner == item.name), None)
        where = owner.where if owner is not None else (binds[0].where if binds else config.source)
        errors.append(f"{where}: systemd passed a socket on {item.describe()} that no "
                      f"frontend binds" + (f" (every bind of {item.name!r} has its socket "
                                           f"already)" if owner is not None else ""))
    if errors:
        raise SocketError(errors)
    return matched, stale


class FdStore:
    """What this master keeps in systemd's fd store: the one owner of that knowledge."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        # By address, the name systemd knows its socket by: a socket that
        # came back may carry the name an older config gave it.
        self.names: dict[Address, str] = {}

    @classmethod
    def from_environment(cls) -> "FdStore":
        """Enabled when FDSTORE (FileDescriptorStoreMax=) is a number > 0."""
        value = os.environ.get("FDSTORE", "")
        return cls(int(value) if value.isdigit() else 0)

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def came_back(self, address: Address, name: str) -> None:
        """systemd passed this socket back from the store, where it stays."""
        self.names[address] = name

    def keep(self, address: Address, sock: socket.socket) -> None:
        """Hand systemd a copy of a socket this master bound."""
        if not self.enabled or address in self.names:
            return
        if len(self.names) >= self.capacity:
            log.warning("not storing the socket of %s: FileDescriptorStoreMax=%d is full; "
                        "a restart refuses its clients", address, self.capacity)
            return
        name = store_name(address)
        notify("FDSTORE=1", f"FDNAME={name}", fds=[sock.fileno()])
        self.names[address] = name

    def forget(self, address: Address) -> None:
        """The address is no longer served: systemd must close its copy too, or it stays bound."""
        name = self.names.pop(address, None)
        if name is not None:
            remove_stored(name)


def remove_stored(name: str) -> None:
    notify("FDSTOREREMOVE=1", f"FDNAME={name}")


def take_passed_sockets(config: Config, store: FdStore) -> dict[Address, socket.socket]:
    """The sockets systemd passed, for the bind addresses they serve (see the module doc)."""
    passed = passed_sockets()
    try:
        matched, stale = match_passed(passed, config)
    except SocketError:
        for item in passed:
            item.sock.close()
        raise
    for item in stale:
        log.info("systemd passed back the stored socket %s, which the config no longer "
                 "binds: closing it", item.describe())
        remove_stored(item.name)
        item.sock.close()
    taken = {}
    for address, item in matched.items():
        origin = "the fd store" if item.stored else "a socket unit"
        log.info("using the socket %s that systemd passed from %s for %s", item.describe(),
                 origin, address)
        if item.stored:
            store.came_back(address, item.name)
        taken[address] = item.sock
    return taken
