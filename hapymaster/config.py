"""The YAML configuration, parsed once into frozen dataclasses.

Every object remembers where it was written (``where``: file and line), so the
master, ``hapymaster -c`` and the workers can all say FILE:LINE in an error.
Parsing collects every error it finds instead of stopping at the first one:
an operator fixing a config before a Friday reload wants the whole list.

The same text is parsed by the master (to validate a reload before anything
is forked) and by each worker (so a worker started after a package upgrade
runs its own, new, parser on exactly the bytes the master validated).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable

DEFAULT_CONFIG_PATH = "/etc/hapymaster/hapymaster.yaml"
DEFAULT_MASTER_SOCKET = "/run/hapymaster/master.sock"
EMBEDDED_NAME = "<embedded default config>"

# The demo a new user gets with no config at all: two small origin servers that
# the master starts itself (hapymaster.demo), balanced round robin, so that
# repeated requests visibly alternate between "origin-1" and "origin-2".
EMBEDDED_DEMO_ORIGINS = (("origin-1", "127.0.0.1:8081"), ("origin-2", "127.0.0.1:8082"))
EMBEDDED_CONFIG = """\
# hapymaster embedded default config: a demo that serves at once.
global:
  workers: 1
  stats: {bind: "127.0.0.1:8404"}
defaults:
  mode: http
frontends:
  - name: demo
    bind: ["127.0.0.1:8080"]
    default_backend: demo-origins
backends:
  - name: demo-origins
    balance: roundrobin
    check: {interval: 2s, rise: 2, fall: 3, http: "GET /health"}
    servers:
      - {name: origin-1, address: "127.0.0.1:8081", check: true}
      - {name: origin-2, address: "127.0.0.1:8082", check: true}
"""


class ConfigError(Exception):
    """One or more configuration errors, each formatted ``FILE:LINE: message``."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("\n".join(errors))


@dataclass(frozen=True)
class Where:
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


NOWHERE = Where("<none>", 0)


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    @property
    def family_host(self) -> str:
        return self.host

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Timeouts:
    """All in seconds. ``http_keep_alive`` bounds an idle client connection
    between two requests (HAProxy's ``timeout http-keep-alive``).
    ``http_request`` bounds a whole request head; None when not set, and
    then ``client`` does (HAProxy's fallback): see ``head``."""

    connect: float = 5.0
    client: float = 30.0
    server: float = 30.0
    check: float = 2.0
    queue: float = 5.0
    tunnel: float = 3600.0
    http_request: float | None = None
    http_keep_alive: float = 10.0

    @property
    def head(self) -> float:
        """The limit on receiving a whole request head (slowloris): http_request, else client."""
        return self.client if self.http_request is None else self.http_request


@dataclass(frozen=True)
class Stats:
    bind: Address
    where: Where = field(default=NOWHERE, compare=False)


# Syslog facilities by code (RFC 5424 6.2.1), as HAProxy's ``log`` names them.
SYSLOG_FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp",
                     "cron", "auth2", "ftp", "ntp", "audit", "alert", "cron2", "local0", "local1",
                     "local2", "local3", "local4", "local5", "local6", "local7")
ACCESS_LOG_TARGETS = ("journal", "stderr", "file", "syslog")
SYSLOG_FORMATS = ("rfc3164", "rfc5424")


@dataclass(frozen=True)
class AccessLogTarget:
    """``global.access_log``: where the frontends' access log lines go.

    ``target`` None (not set): journald when the worker runs under it, else
    stderr, as the rest of the logs. ``address``: journal, its native socket
    (default /run/systemd/journal/socket); syslog, a unix datagram socket path
    (default /dev/log) or ``host:port`` (UDP); file, the file's path.
    """

    target: str | None = None
    address: str | None = None
    facility: str = "local0"
    format: str = "rfc3164"
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class GlobalSection:
    max_reloads: int = 50
    master_socket: str | None = None
    workers: int = 1
    ready_timeout: float = 10.0
    hard_stop_after: float = 30.0
    # A soft-stopped worker keeps an idle keep-alive client connection this
    # long (its next request is answered with Connection: close) instead of
    # closing it under a client that may be sending on it at that instant.
    soft_stop_grace: float = 1.0
    stats: Stats | None = None
    user: str | None = None
    group: str | None = None
    maxconn: int = 0  # per worker, all frontends together; 0 = no limit
    access_log: AccessLogTarget = AccessLogTarget()
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Route:
    backend: str
    path_prefix: str | None = None
    host: str | None = None
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Network:
    """One entry of ``trusted_proxies``: a CIDR whose forwarding headers are believed."""

    network: ipaddress.IPv4Network | ipaddress.IPv6Network
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Frontend:
    name: str
    bind: tuple[Address, ...]
    default_backend: str
    mode: str = "http"
    routes: tuple[Route, ...] = ()
    timeout: Timeouts = Timeouts()
    maxconn: int = 10000
    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    forwarded: bool = True
    # Clients whose own X-Forwarded-For/-Proto and Forwarded are extended
    # (theirs, then ours); anyone else's are replaced by ours.
    trusted_proxies: tuple[Network, ...] = ()
    access_log: bool = True  # one httplog/tcplog line per request/session
    max_body_size: int = 0  # bytes; a larger request body gets 413 (0 = no limit)
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class HealthCheck:
    interval: float = 2.0
    rise: int = 2
    fall: int = 3
    http_method: str | None = None  # None: TCP connect check
    http_path: str | None = None
    expect_status: tuple[int, int] = (200, 399)
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Server:
    name: str
    address: Address
    weight: int = 1
    check: bool = False
    maxconn: int = 0
    backup: bool = False
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Backend:
    name: str
    servers: tuple[Server, ...]
    mode: str = "http"
    balance: str = "roundrobin"
    check: HealthCheck | None = None
    timeout: Timeouts = Timeouts()
    where: Where = field(default=NOWHERE, compare=False)


@dataclass(frozen=True)
class Config:
    global_: GlobalSection
    frontends: tuple[Frontend, ...]
    backends: tuple[Backend, ...]
    source: str = EMBEDDED_NAME

    def backend(self, name: str) -> Backend:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


MODES = ("http", "tcp")
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "source", "first", "random")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)\s*$")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``5s``, ``2m``, ``1h`` or an integer of milliseconds → seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 5s or 500ms, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a duration cannot be negative: {value}")
        return value / 1000.0
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2)]
    raise ValueError(f"expected a duration such as 5s or 500ms, got {value!r}")


def parse_address(text: Any) -> Address:
    """``host:port``, ``[v6]:port`` or ``*:port`` / ``:port`` (all IPv4 addresses)."""
    if not isinstance(text, str):
        raise ValueError(f"expected an address such as \"127.0.0.1:8080\", got {text!r}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"address {text!r} needs a port, such as \"127.0.0.1:8080\"")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} in {text!r} is out of range 1-65535")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host in ("", "*"):
        host = "0.0.0.0"
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", host):
            raise ValueError(f"address {text!r} has an invalid host {host!r}") from None
    return Address(host, port)


# --- YAML with line numbers ------------------------------------------------


class _Map(dict):
    """A YAML mapping that knows the line of itself and of each of its keys."""

    line: int
    key_lines: dict[str, int]


class _Seq(list):
    line: int
    item_lines: list[int]


@functools.cache
def _yaml_loader() -> Any:
    """The YAML loader class that records lines, made (and yaml imported) on first use.

    Not at import: a worker imports this module for the classes of the
    config the master pickled for it, and never parses. PyYAML (libyaml) in
    the worker template was 0.4 MiB of every worker's idle RSS (issue 9),
    for the rare template that parses (it runs newer code than the master).
    """
    import yaml

    # libyaml's parser when PyYAML has it (Debian's python3-yaml does): ten
    # times faster on a config than the pure-Python one, on the reload's
    # critical path in the master. Its nodes carry the same marks.
    safe_loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    constructor_error = yaml.constructor.ConstructorError

    class Loader(safe_loader):  # type: ignore[misc, valid-type]
        def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> _Map:  # type: ignore[override]
            self.flatten_mapping(node)
            result = _Map()
            result.line = node.start_mark.line + 1
            result.key_lines = {}
            for key_node, value_node in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    raise constructor_error(
                        None, None, f"key {key!r} must be a string", key_node.start_mark)
                if key in result:
                    raise constructor_error(
                        None, None,
                        f"duplicate key {key!r} (first at line {result.key_lines[key]})",
                        key_node.start_mark)
                result[key] = self.construct_object(value_node, deep=True)
                result.key_lines[key] = line
            return result

        def construct_sequence(self, node: yaml.SequenceNode, deep: bool = False) -> _Seq:  # type: ignore[override]
            result = _Seq(self.construct_object(child, deep=True) for child in node.value)
            result.line = node.start_mark.line + 1
            result.item_lines = [child.start_mark.line + 1 for child in node.value]
            return result

    Loader.add_constructor("tag:yaml.org,2002:map", Loader.construct_mapping)
    Loader.add_constructor("tag:yaml.org,2002:seq", Loader.construct_sequence)
    return Loader


class _Parser:
    """Walks the loaded YAML, building dataclasses and collecting errors."""

    def __init__(self, filename: str):
        self.filename = filename
        self.errors: list[str] = []

    def error(self, line: int, message: str) -> None:
        self.errors.append(f"{self.filename}:{line}: {message}")

    def where(self, line: int) -> Where:
        return Where(self.filename, line)

    def section(self, value: Any, line: int, what: str, allowed: Iterable[str],
                required: Iterable[str] = ()) -> _Map | None:
        """Check that ``value`` is a mapping with only ``allowed`` keys."""
        if not isinstance(value, _Map):
            self.error(line, f"{what} must be a mapping, got {_kind(value)}")
            return None
        allowed = tuple(allowed)
        for key in value:
            if key not in allowed:
                hint = _suggest(key, allowed)
                self.error(value.key_lines[key], f"unknown key {key!r} in {what}{hint}")
        for key in required:
            if key not in value:
                self.error(value.line, f"{what} needs {key!r}")
        return value

    def get(self, section: _Map, key: str, convert: Callable[[Any], Any], default: Any,
            what: str) -> Any:
        if key not in section:
            return default
        try:
            return convert(section[key])
        except (ValueError, TypeError) as exc:
            self.error(section.key_lines[key], f"{what}.{key}: {exc}")
            return default

    # --- sections ---------------------------------------------------------

    def parse(self, doc: Any) -> Config | None:
        top = self.section(doc, 1, "the top level", ("global", "defaults", "frontends", "backends"),
                           ("frontends", "backends"))
        if top is None:
            return None
        glob = self.global_section(top.get("global", _empty_map(top.line)),
                                   top.key_lines.get("global", top.line))
        defaults = self.section(top.get("defaults", _empty_map(top.line)),
                                top.key_lines.get("defaults", top.line), "defaults",
                                _DEFAULTS_KEYS) or _empty_map(top.line)
        frontends = tuple(self.items(top, "frontends", lambda v, ln: self.frontend(v, ln, defaults)))
        backends = tuple(self.items(top, "backends", lambda v, ln: self.backend(v, ln, defaults)))
        self.cross_check(glob, frontends, backends)
        return Config(glob, frontends, backends, self.filename)

    def items(self, top: _Map, key: str, build: Callable[[Any, int], Any]) -> Iterable[Any]:
        if key not in top:
            return []
        value = top[key]
        if not isinstance(value, _Seq) or not value:
            self.error(top.key_lines[key], f"{key} must be a non-empty list")
            return []
        built = (build(item, line) for item, line in zip(value, value.item_lines))
        return [item for item in built if item is not None]

    def global_section(self, value: Any, line: int) -> GlobalSection:
        section = self.section(value, line, "global", (f.name for f in fields(GlobalSection)
                                                       if f.name != "where"))
        if section is None:
            return GlobalSection()
        stats = None
        if "stats" in section:
            stats_map = self.section(section["stats"], section.key_lines["stats"], "global.stats",
                                     ("bind",), ("bind",))
            if stats_map is not None and "bind" in stats_map:
                bind = self.get(stats_map, "bind", parse_address, None, "global.stats")
                if bind is not None:
                    stats = Stats(bind, self.where(stats_map.key_lines["bind"]))
        return GlobalSection(
            max_reloads=self.get(section, "max_reloads", _count(0), 50, "global"),
            master_socket=self.get(section, "master_socket", _string, None, "global"),
            workers=self.get(section, "workers", _count(1, 64), 1, "global"),
            ready_timeout=self.get(section, "ready_timeout", _positive_duration, 10.0, "global"),
            hard_stop_after=self.get(section, "hard_stop_after", _positive_duration, 30.0, "global"),
            soft_stop_grace=self.get(section, "soft_stop_grace", parse_duration, 1.0, "global"),
            stats=stats,
            user=self.get(section, "user", _string, None, "global"),
            group=self.get(section, "group", _string, None, "global"),
            maxconn=self.get(section, "maxconn", _count(0), 0, "global"),
            access_log=self.access_log_target(section),
            where=self.where(section.line),
        )

    def access_log_target(self, section: _Map) -> AccessLogTarget:
        if "access_log" not in section:
            return AccessLogTarget()
        what = "global.access_log"
        line = section.key_lines["access_log"]
        table = self.section(section["access_log"], line, what,
                             ("target", "address", "facility", "format"), ("target",))
        if table is None or "target" not in table:
            return AccessLogTarget()
        target = self.get(table, "target", _choice(ACCESS_LOG_TARGETS), None, what)
        if target is None:
            return AccessLogTarget()
        for key in ("facility", "format"):
            if key in table and target != "syslog":
                self.error(table.key_lines[key], f"{what}.{key} applies to target syslog only")
        if "address" in table and target == "stderr":
            self.error(table.key_lines["address"], f"{what}.address: target stderr takes none")
        if target == "file" and "address" not in table:
            self.error(table.line, f"{what}: target file needs 'address' (the file's path)")
        address = self.get(table, "address", _log_address(target), None, what)
        return AccessLogTarget(
            target=target, address=address,
            facility=self.get(table, "facility", _choice(SYSLOG_FACILITIES), "local0", what),
            format=self.get(table, "format", _choice(SYSLOG_FORMATS), "rfc3164", what),
            where=self.where(table.line))

    def timeouts(self, section: _Map, defaults: _Map, what: str) -> Timeouts:
        result = Timeouts()
        for source, label in ((defaults, "defaults"), (section, what)):
            if "timeout" not in source:
                continue
            table = self.section(source["timeout"], source.key_lines["timeout"],
                                 f"{label}.timeout", (f.name for f in fields(Timeouts)))
            if table is None:
                continue
            changes = {key: self.get(table, key, _positive_duration, getattr(result, key),
                                     f"{label}.timeout") for key in table if hasattr(result, key)}
            result = replace(result, **changes)
        return result

    def inherited(self, section: _Map, defaults: _Map, key: str, convert: Callable[[Any], Any],
                  default: Any, what: str) -> Any:
        """A key that ``defaults`` may set for every frontend/backend."""
        value = self.get(defaults, key, convert, default, "defaults")
        return self.get(section, key, convert, value, what)

    def frontend(self, value: Any, line: int, defaults: _Map) -> Frontend | None:
        section = self.section(value, line, "frontend", _FRONTEND_KEYS,
                               ("name", "bind", "default_backend"))
        if section is None or "name" not in section:
            return None
        name = self.get(section, "name", _name, "?", "frontend")
        what = f"frontend {name!r}"
        binds = self.get(section, "bind", _string_list, [], what)
        if "bind" in section and not binds:
            self.error(section.key_lines["bind"], f"{what}.bind lists no address")
        bind_lines = _item_lines(section, "bind")
        addresses = []
        for text, bind_line in zip(binds, bind_lines):
            try:
                addresses.append(parse_address(text))
            except ValueError as exc:
                self.error(bind_line, f"{what}.bind: {exc}")
        routes = []
        if "routes" in section:
            raw = section["routes"]
            if not isinstance(raw, _Seq):
                self.error(section.key_lines["routes"], f"{what}.routes must be a list")
            else:
                for item, item_line in zip(raw, raw.item_lines):
                    route = self.route(item, item_line, what)
                    if route is not None:
                        routes.append(route)
        return Frontend(
            name=name,
            bind=tuple(addresses),
            default_backend=self.get(section, "default_backend", _name, "", what),
            mode=self.inherited(section, defaults, "mode", _choice(MODES), "http", what),
            routes=tuple(routes),
            timeout=self.timeouts(section, defaults, what),
            maxconn=self.inherited(section, defaults, "maxconn", _count(0), 10000, what),
            x_forwarded_for=self.inherited(section, defaults, "x_forwarded_for", _bool, True, what),
            x_forwarded_proto=self.inherited(section, defaults, "x_forwarded_proto", _bool, True, what),
            forwarded=self.inherited(section, defaults, "forwarded", _bool, True, what),
            trusted_proxies=self.networks(section if "trusted_proxies" in section else defaults,
                                          "defaults" if "trusted_proxies" not in section else what),
            access_log=self.inherited(section, defaults, "access_log", _bool, True, what),
            max_body_size=self.inherited(section, defaults, "max_body_size", _count(0), 0, what),
            where=self.where(section.line),
        )

    def networks(self, section: _Map, what: str) -> tuple[Network, ...]:
        """``trusted_proxies``: a list of CIDRs (an address alone is a /32 or /128)."""
        if "trusted_proxies" not in section:
            return ()
        raw = section["trusted_proxies"]
        line = section.key_lines["trusted_proxies"]
        if not isinstance(raw, _Seq):
            self.error(line, f"{what}.trusted_proxies must be a list of CIDRs such as "
                             f"\"10.0.0.0/8\", got {_kind(raw)}")
            return ()
        result = []
        for item, item_line in zip(raw, raw.item_lines):
            try:
                if not isinstance(item, str):
                    raise ValueError(f"expected a CIDR such as \"10.0.0.0/8\", got {_kind(item)}")
                result.append(Network(ipaddress.ip_network(item, strict=True),
                                      self.where(item_line)))
            except ValueError as exc:
                self.error(item_line, f"{what}.trusted_proxies: {exc}")
        return tuple(result)

    def route(self, value: Any, line: int, what: str) -> Route | None:
        section = self.section(value, line, f"{what} route", ("path_prefix", "host", "backend"),
                               ("backend",))
        if section is None or "backend" not in section:
            return None
        if "path_prefix" not in section and "host" not in section:
            self.error(section.line, f"{what} route needs path_prefix or host (or both)")
        path_prefix = self.get(section, "path_prefix", _path, None, f"{what} route")
        host = self.get(section, "host", _string, None, f"{what} route")
        return Route(backend=self.get(section, "backend", _name, "", f"{what} route"),
                     path_prefix=path_prefix, host=host.lower() if host else None,
                     where=self.where(section.line))

    def backend(self, value: Any, line: int, defaults: _Map) -> Backend | None:
        section = self.section(value, line, "backend", _BACKEND_KEYS, ("name", "servers"))
        if section is None or "name" not in section:
            return None
        name = self.get(section, "name", _name, "?", "backend")
        what = f"backend {name!r}"
        servers = []
        raw = section.get("servers")
        if raw is not None:
            if not isinstance(raw, _Seq) or not raw:
                self.error(section.key_lines["servers"], f"{what}.servers must be a non-empty list")
            else:
                for item, item_line in zip(raw, raw.item_lines):
                    server = self.server(item, item_line, what)
                    if server is not None:
                        servers.append(server)
        seen: dict[str, int] = {}
        for server in servers:
            if server.name in seen:
                self.error(server.where.line, f"{what}: duplicate server name {server.name!r} "
                                              f"(first at line {seen[server.name]})")
            seen.setdefault(server.name, server.where.line)
        check = None
        check_source = section if "check" in section else defaults if "check" in defaults else None
        if check_source is not None:
            check = self.health_check(check_source["check"], check_source.key_lines["check"], what)
        return Backend(
            name=name,
            servers=tuple(servers),
            mode=self.inherited(section, defaults, "mode", _choice(MODES), "http", what),
            balance=self.inherited(section, defaults, "balance", _choice(BALANCE_ALGORITHMS),
                                   "roundrobin", what),
            check=check,
            timeout=self.timeouts(section, defaults, what),
            where=self.where(section.line),
        )

    def health_check(self, value: Any, line: int, what: str) -> HealthCheck | None:
        section = self.section(value, line, f"{what}.check",
                               ("interval", "rise", "fall", "http", "expect"))
        if section is None:
            return None
        method = path = None
        if "http" in section:
            request = self.get(section, "http", _http_check, None, f"{what}.check")
            if request is not None:
                method, path = request
        return HealthCheck(
            interval=self.get(section, "interval", _positive_duration, 2.0, f"{what}.check"),
            rise=self.get(section, "rise", _count(1), 2, f"{what}.check"),
            fall=self.get(section, "fall", _count(1), 3, f"{what}.check"),
            http_method=method,
            http_path=path,
            expect_status=self.get(section, "expect", _status_range, (200, 399), f"{what}.check"),
            where=self.where(section.line),
        )

    def server(self, value: Any, line: int, what: str) -> Server | None:
        section = self.section(value, line, f"{what} server",
                               ("name", "address", "weight", "check", "maxconn", "backup"),
                               ("name", "address"))
        if section is None or "name" not in section or "address" not in section:
            return None
        name = self.get(section, "name", _name, "?", f"{what} server")
        where = f"{what} server {name!r}"
        address = self.get(section, "address", parse_address, None, where)
        if address is None:
            return None
        return Server(
            name=name,
            address=address,
            weight=self.get(section, "weight", _count(0, 256), 1, where),
            check=self.get(section, "check", _bool, False, where),
            maxconn=self.get(section, "maxconn", _count(0), 0, where),
            backup=self.get(section, "backup", _bool, False, where),
            where=self.where(section.line),
        )

    def cross_check(self, glob: GlobalSection, frontends: tuple[Frontend, ...],
                    backends: tuple[Backend, ...]) -> None:
        """What no single section can see: names, references, modes, bind clashes."""
        backend_by_name: dict[str, Backend] = {}
        for backend in backends:
            if backend.name in backend_by_name:
                self.error(backend.where.line, f"duplicate backend name {backend.name!r} "
                                               f"(first at line {backend_by_name[backend.name].where.line})")
            backend_by_name.setdefault(backend.name, backend)
        names: dict[str, int] = {}
        bound: dict[Address, str] = {}
        if glob.stats is not None:
            bound[glob.stats.bind] = "global.stats"
        for frontend in frontends:
            if frontend.name in names:
                self.error(frontend.where.line, f"duplicate frontend name {frontend.name!r} "
                                                f"(first at line {names[frontend.name]})")
            names.setdefault(frontend.name, frontend.where.line)
            for address in frontend.bind:
                if address in bound:
                    self.error(frontend.where.line, f"frontend {frontend.name!r}: {address} is "
                                                    f"already bound by {bound[address]}")
                bound.setdefault(address, f"frontend {frontend.name!r}")
            if frontend.mode == "tcp" and frontend.routes:
                self.error(frontend.routes[0].where.line,
                           f"frontend {frontend.name!r}: routes need mode http")
            targets = [(frontend.default_backend, frontend.where.line)]
            targets += [(route.backend, route.where.line) for route in frontend.routes]
            for target, line in targets:
                backend = backend_by_name.get(target)
                if backend is None:
                    self.error(line, f"frontend {frontend.name!r} uses backend {target!r}, "
                                     f"which is not defined")
                elif backend.mode != frontend.mode:
                    self.error(line, f"frontend {frontend.name!r} is mode {frontend.mode} but "
                                     f"backend {target!r} is mode {backend.mode}")


_DEFAULTS_KEYS = ("mode", "timeout", "maxconn", "balance", "check",
                  "x_forwarded_for", "x_forwarded_proto", "forwarded", "trusted_proxies",
                  "access_log", "max_body_size")
_FRONTEND_KEYS = ("name", "bind", "mode", "default_backend", "routes", "timeout", "maxconn",
                  "x_forwarded_for", "x_forwarded_proto", "forwarded", "trusted_proxies",
                  "access_log", "max_body_size")
_BACKEND_KEYS = ("name", "mode", "balance", "check", "servers", "timeout")


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


def _suggest(key: str, allowed: tuple[str, ...]) -> str:
    import difflib   # only for a config with a mistake: not in every worker (issue 9)
    close = difflib.get_close_matches(key, allowed, n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(allowed)})"


def _empty_map(line: int) -> _Map:
    result = _Map()
    result.line = line
    result.key_lines = {}
    return result


def _item_lines(section: _Map, key: str) -> list[int]:
    value = section.get(key)
    if isinstance(value, _Seq):
        return value.item_lines
    return [section.key_lines.get(key, section.line)]


def _string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    return value


def _name(value: Any) -> str:
    text = _string(value)
    if not re.fullmatch(r"[A-Za-z0-9_.:-]+", text):
        raise ValueError(f"name {text!r} may only use letters, digits and _ . : -")
    return text


def _log_address(target: str | None) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        text = _string(value)
        if text.startswith("/"):
            return text
        if target == "syslog":
            return str(parse_address(text))
        raise ValueError(f"expected an absolute path{' or host:port' if target == 'syslog' else ''}"
                         f", got {text!r}")
    return convert


def _path(value: Any) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"path_prefix must start with '/', got {text!r}")
    return text


def _string_list(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected an address string or a list of them, got {_kind(item)}")
    return list(items)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _count(low: int, high: int | None = None) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            bounds = f"{low}..{high}" if high is not None else f">= {low}"
            raise ValueError(f"{value} is out of range ({bounds})")
        return value
    return convert


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def convert(value: Any) -> str:
        if value not in options:
            raise ValueError(f"expected one of {', '.join(options)}, got {value!r}")
        return value
    return convert


def _positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError(f"duration must be greater than zero, got {value!r}")
    return seconds


def _http_check(value: Any) -> tuple[str, str]:
    parts = _string(value).split()
    if len(parts) == 1 and parts[0].startswith("/"):
        return "GET", parts[0]
    if len(parts) != 2 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise ValueError(f"expected \"METHOD /path\" such as \"GET /health\", got {value!r}")
    return parts[0].upper(), parts[1]


def _status_range(value: Any) -> tuple[int, int]:
    text = str(value)
    match = re.fullmatch(r"\s*(\d{3})\s*(?:-\s*(\d{3}))?\s*", text)
    if not match:
        raise ValueError(f"expected a status such as 200 or a range such as 200-399, got {value!r}")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if not 100 <= low <= high <= 599:
        raise ValueError(f"status range {text!r} must lie within 100-599")
    return low, high


def parse_config(text: str, filename: str) -> Config:
    """Parse and validate config text; raise ConfigError with every problem found."""
    loader = _yaml_loader()
    import yaml   # imported by _yaml_loader(): a dict lookup
    try:
        doc = yaml.load(text, Loader=loader)  # noqa: S506 - a (C)SafeLoader
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise ConfigError([f"{filename}:{line}: YAML syntax error: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{filename}:1: YAML error: {exc}"]) from None
    parser = _Parser(filename)
    config = parser.parse(doc)
    if parser.errors or config is None:
        raise ConfigError(sorted(set(parser.errors), key=_error_order))
    return config


def _error_order(error: str) -> tuple[int, str]:
    try:
        return int(error.split(":")[1]), error
    except (IndexError, ValueError):
        return 0, error


def read_config(path: str) -> tuple[Config, str]:
    """Read and parse a config file; return the config and the exact text parsed."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}:0: cannot read the config: {exc.strerror}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}:0: the config is not valid UTF-8: {exc.reason}"]) from None
    return parse_config(text, path), text
