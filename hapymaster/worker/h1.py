"""HTTP/1.x message rules, with no I/O: bytes and header lists in, bytes out.

What HAProxy keeps in ``h1.c`` and the proxy must decide for every message:
which headers are hop-by-hop, how a body is framed on each side, whether
the client connection stays open, and the heads as they are sent on. The
connection code (``proxy_http``) calls these; the tests call them directly.

On the way in: where a request head ends, whether its request line and
Host are valid, and its chunked body decoded (``ChunkedDecoder``), the
parts of RFC 9112 that httptools (llhttp) gets wrong for a proxy.

The server side always speaks HTTP/1.1 with keep-alive. To the client, a
body is sent with the framing the server gave it, except a body delimited
by the server closing, which HTTP/1.1 clients get chunked (so that they
keep their connection) and HTTP/1.0 clients get with a close.
"""

from __future__ import annotations

import re
from typing import Final

# Limits in the spirit of HAProxy's tune.bufsize (16 kB): a request line
# longer than MAX_URL gets 414, a header section beyond MAX_HEAD or more than
# MAX_HEADERS fields gets 431.
MAX_URL: Final = 8192
MAX_HEAD: Final = 16384
MAX_HEADERS: Final = 100

# Headers that concern one hop only (RFC 9110 7.6.1) and are never forwarded;
# the proxy writes its own framing and connection management.
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"proxy-authenticate"))
# Connection values that name no other header.
PLAIN_CONNECTION = frozenset((b"keep-alive", b"close", b"upgrade"))
# A Connection header cannot make these disappear: they frame or route the message.
NEVER_HOP = frozenset((b"host", b"content-length", b"close", b"keep-alive", b"upgrade"))
# Response headers the framing decision looks at. The server connection
# sets them aside, lowered, as they are parsed, so that the usual five or six
# headers are lowered and classified once.
RESPONSE_SPECIAL = HOP_BY_HOP | {b"content-length"}

LAST_CHUNK: Final = b"0\r\n\r\n"


def content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """The body length a request head announces; -1 when it is chunked or not said."""
    length = -1
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return -1
        if lname == b"content-length":
            length = int(value)
    return length


def chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """One chunk of a chunked body, as parts for writelines."""
    return (b"%x\r\n" % len(data), data, b"\r\n")


def _connection_tokens(value: bytes) -> tuple[bytes, ...]:
    """Header names a Connection value declares hop-by-hop.

    Called only for a value that is not one of PLAIN_CONNECTION (the common
    ``keep-alive`` / ``close`` is checked inline, without a call).
    """
    return tuple(t.strip().lower() for t in value.split(b","))


# The forwarding fields the proxy writes itself. A client's own are never
# passed on next to ours (any client could claim X-Forwarded-Proto: https):
# they are dropped, or extended when the client is a trusted proxy.
FORWARDING_FIELDS = (b"x-forwarded-for", b"x-forwarded-proto", b"forwarded")


def request_skip(x_forwarded_for: bool, x_forwarded_proto: bool, forwarded: bool) -> frozenset:
    """The lowered request header names never copied as such to the server:
    hop-by-hop ones and the forwarding fields the proxy writes (one set per frontend)."""
    written = (x_forwarded_for, x_forwarded_proto, forwarded)
    return HOP_BY_HOP | {name for name, on in zip(FORWARDING_FIELDS, written) if on}


def forwarding_headers(client_ip: str, x_forwarded_for: bool, x_forwarded_proto: bool,
                       forwarded: bool, claims: dict[bytes, list[bytes]] | None = None) -> bytes:
    """X-Forwarded-For/-Proto and Forwarded (RFC 7239), with the blank line that ends the head.

    ``claims``: the values a trusted proxy in front of us sent, by lowered
    name; ours are appended to its X-Forwarded-For and Forwarded lists, and
    its X-Forwarded-Proto (the scheme its client used) is kept instead of ours.
    """
    claims = claims or {}
    text = ""
    if x_forwarded_for:
        prior = claims.get(b"x-forwarded-for")
        before = ", ".join(v.decode("latin-1") for v in prior) + ", " if prior else ""
        text += f"X-Forwarded-For: {before}{client_ip}\r\n"
    if x_forwarded_proto:
        prior = claims.get(b"x-forwarded-proto")
        proto = prior[-1].decode("latin-1") if prior else "http"
        text += f"X-Forwarded-Proto: {proto}\r\n"
    if forwarded:
        prior = claims.get(b"forwarded")
        before = ", ".join(v.decode("latin-1") for v in prior) + ", " if prior else ""
        node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
        text += f"Forwarded: {before}for={node};proto=http\r\n"
    return (text + "\r\n").encode("latin-1")


def authority(url: bytes) -> bytes:
    """The host[:port] of an absolute-form request target, b"" for any other form."""
    lower = url[:8].lower()
    if not (lower.startswith(b"http://") or lower.startswith(b"https://")):
        return b""
    hostport = url.split(b"/", 3)[2]
    return hostport.rpartition(b"@")[2]


def request_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], upgrade: bool,
                 forwarding: bytes, skip: frozenset = HOP_BY_HOP, trusted_ip: str | None = None,
                 default_host: bytes = b"", target_host: bytes = b""
                 ) -> tuple[bytes, bytes, bool, bool]:
    """The request as sent to the server: ``(head, host, chunked, has_body)``.

    Hop-by-hop headers (and those named by Connection) are dropped, the
    framing is restated (a chunked body stays chunked, with the codings
    before chunked kept: they are the body's, RFC 9112 6.1), an Upgrade
    asked by the client is passed on, ``forwarding`` (see forwarding_headers)
    ends it. ``skip`` (request_skip) also holds the forwarding fields the
    proxy writes: the client's are dropped, or, when it is a trusted proxy
    (``trusted_ip``, its address), extended. ``default_host``: the Host sent
    when the client sent none (HTTP/1.0; the request goes on as HTTP/1.1,
    which needs one). ``target_host``: the authority of an absolute-form
    target, sent as Host instead of the client's (RFC 9112 3.2.2).
    """
    lines = [method, b" ", url, b" HTTP/1.1\r\n"]
    extra_hop: tuple[bytes, ...] = ()
    upgrade_value = b""
    codings: list[bytes] | None = None
    claims: dict[bytes, list[bytes]] | None = None
    length = None
    host = b""
    for name, value in headers:
        lname = name.lower()
        if lname in skip:
            if lname == b"connection":
                if value.lower() not in PLAIN_CONNECTION:
                    extra_hop += _connection_tokens(value)
            elif lname == b"transfer-encoding":
                if codings is None:
                    codings = []
                codings.append(value)
            elif lname == b"upgrade":
                upgrade_value = value
            elif trusted_ip is not None and lname not in HOP_BY_HOP:
                if claims is None:
                    claims = {}
                claims.setdefault(lname, []).append(value)
            continue
        if lname == b"content-length":
            length = value
        elif lname == b"host":
            host = value
            if target_host:
                continue
        lines += (name, b": ", value, b"\r\n")
    if extra_hop:
        extra_hop = tuple(t for t in extra_hop if t not in NEVER_HOP)
    if extra_hop:
        # Drop what the client's Connection header declared hop-by-hop.
        lines = [method, b" ", url, b" HTTP/1.1\r\n"]
        for name, value in headers:
            lname = name.lower()
            if lname not in skip and lname not in extra_hop and not (
                    target_host and lname == b"host"):
                lines += (name, b": ", value, b"\r\n")
    if target_host:
        host = target_host
        lines += (b"Host: ", host, b"\r\n")
    elif not host and default_host:
        host = default_host
        lines += (b"Host: ", host, b"\r\n")
    chunked = codings is not None
    if codings is not None:
        # Restated from the list elements, without the OWS around them: a
        # "chunked<TAB>" that the client's parser took is refused by a strict
        # server's (found by the request-path fuzzer).
        elements = [c.strip(b" \t") for c in b",".join(codings).split(b",")]
        elements = [c for c in elements if c]
        if len(elements) == 1 and elements[0].lower() == b"chunked":
            lines.append(b"Transfer-Encoding: chunked\r\n")
        else:
            lines += (b"Transfer-Encoding: ", b", ".join(elements), b"\r\n")
    has_body = chunked or (length is not None and length != b"0")
    if upgrade and upgrade_value:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    if claims is not None and trusted_ip is not None:     # claims: a trusted peer's only
        forwarding = forwarding_headers(trusted_ip, b"x-forwarded-for" in skip,
                                        b"x-forwarded-proto" in skip, b"forwarded" in skip, claims)
    lines.append(forwarding)
    return b"".join(lines), host, chunked, has_body


# --- the request as it arrives: its head's end, request line, Host, chunked body --------

# RFC 9110 5.6.2: tchar. ``bytes.translate`` deleting these leaves nothing of a token.
TCHARS = (b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
          b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Methods the parser (llhttp) knows. Any other token is a valid method too
# (RFC 9110 9.1: PURGE, -BLARGH): the parser is fed STAND_IN in its place,
# whose framing is the same (a request's framing does not depend on its
# method, CONNECT aside), and the real token is forwarded.
PARSER_METHODS = frozenset((b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH",
                            b"TRACE"))
STAND_IN: Final = b"GET"
VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


# transfer-coding = token *( OWS ";" OWS token "=" ( token / quoted-string ) ), RFC 9112 7 / 9110 5.6
_CODING = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
                     rb"(?:[ \t]*;[ \t]*[!#$%&'*+.^_`|~0-9A-Za-z-]+="
                     rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+|\"(?:[^\"\\\x00-\x08\x0a-\x1f\x7f]|\\.)*\"))*")


def transfer_codings(value: bytes) -> list[bytes] | None:
    """The coding names of one Transfer-Encoding field, lowercased; None if it is not a list of
    transfer codings with chunked, if there, last.

    llhttp only looks for ``chunked`` at the end of the value, and checks that
    a request's codings end in chunked only after the head was handed over:
    a field such as ``x: chunked`` or ``hunked`` was forwarded, then failed:
    a request half sent to the server. So each field is checked as it
    arrives, and the last coding at the end of the head, before anything is
    forwarded (RFC 9112 6.3: a request whose final coding is not chunked: 400).
    """
    codings = [c.strip(b" \t") for c in value.split(b",")]
    codings = [c for c in codings if c]     # empty list elements are allowed (RFC 9110 5.6.1)
    if not codings or any(_CODING.fullmatch(c) is None for c in codings):
        return None
    names = [c.split(b";", 1)[0].strip(b" \t").lower() for c in codings]
    return None if b"chunked" in names[:-1] else names


def transfer_coding_error(value: bytes) -> bool:
    """Is one Transfer-Encoding field not a valid list of transfer codings (see transfer_codings)?"""
    return transfer_codings(value) is None


def request_line(line: bytes) -> tuple[bytes, int]:
    """``(method, error)`` of a request line without its CRLF (RFC 9112 3).

    ``error`` is 0, or the status to answer: 400 for anything but
    ``token SP target SP HTTP/1.x`` (an HTTP/0.9 ``GET /`` included: it has
    no version, and waiting for one would only end in a timeout), 405 for
    CONNECT (no tunnels to arbitrary hosts). The target's characters are the
    parser's to check.
    """
    parts = line.split(b" ")
    if len(parts) != 3 or parts[2] not in VERSIONS or not parts[1]:
        return b"", 400
    method = parts[0]
    if method not in PARSER_METHODS:
        if not method or method.translate(None, TCHARS):
            return b"", 400
        if method == b"CONNECT":
            return method, 405
    return method, 0


# Control characters no head may hold (CR, LF and HTAB have their places).
_CTL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def partial_head_error(buf: bytes) -> int:
    """The status for the start of a head still incomplete, 0 while it may yet be valid.

    What the parser would only see once the head is whole: a bad request line
    (answered as soon as its CRLF is there), a bare LF (a head ending in LF LF
    would otherwise wait for a CRLF CRLF that never comes), a line too long.
    """
    if _CTL.search(buf) is not None:
        return 400
    lines = buf.count(b"\r\n")
    if buf.count(b"\n") != lines or buf.count(b"\r") != lines + (buf[-1] == 13):
        return 400      # a bare LF or CR (a CR last may be half of a CRLF)
    if not lines:
        return 414 if len(buf) > MAX_URL else 0
    _, error = request_line(buf[:buf.find(b"\r\n")])
    if error:
        return error
    return 431 if len(buf) > MAX_HEAD else 0


# RFC 3986 3.2.2-3 host [":" port]: an IP-literal or a reg-name (IPv4 is one).
# RFC 9112 3.2 allows an empty Host (a target without an authority).
_REG_NAME = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~!$&'()*+,;=%"
_HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def host_error(count: int, host: bytes, version: str) -> bool:
    """Whether RFC 9112 3.2 says 400, given the number of Host fields and the last one's
    value: two or more, an invalid one, or none in HTTP/1.1."""
    if count != 1:
        return count > 1 or version == "1.1"
    # Most hosts are a reg-name and a port: checked without the regex
    # (translate deletes the reg-name characters, digits among them).
    left = host.translate(None, _REG_NAME)
    if not left:
        return False
    if left == b":":
        return not host.rpartition(b":")[2].isdigit() and not host.endswith(b":")
    return _HOST.fullmatch(host) is None


# chunk = chunk-size *( BWS ";" BWS ext-name [ BWS "=" BWS ext-value ] ) CRLF (RFC 9112 7.1.1);
# ext-value a token or a quoted-string. The parser refuses the BWS, so the
# proxy decodes the chunked layer itself.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*" + _TOKEN
                         + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*")
# A trailer field line: name ":" value, no CTL but HTAB (trailers are read and dropped).
_TRAILER = re.compile(_TOKEN + rb":[\t \x21-\x7e\x80-\xff]*")
MAX_CHUNK_LINE: Final = 4096

_SIZE, _DATA, _DATA_END, _TRAILERS = range(4)


class ChunkedDecoder:
    """The chunked layer of a request body (RFC 9112 7.1), decoded as it arrives.

    Extensions and trailers are read and dropped (the proxy re-chunks the
    body to the server). ``feed`` raises ValueError on a framing error.
    """

    __slots__ = ("state", "left", "line", "trailer_size")

    def __init__(self) -> None:
        self.state = _SIZE
        self.left = 0           # bytes of the current chunk's data still to come
        self.line = b""         # a size or trailer line not ended yet
        self.trailer_size = 0

    def feed(self, data: bytes, pos: int = 0) -> tuple[list[bytes], int]:
        """``(pieces, end)``: the body bytes in ``data`` from ``pos`` on, and the
        offset just after the body's last byte, or -1 when it goes on beyond ``data``."""
        pieces = []
        size = len(data)
        while pos < size:
            state = self.state
            if state == _DATA:
                take = min(self.left, size - pos)
                pieces.append(data if take == size else data[pos:pos + take])  # take == size: pos 0
                pos += take
                self.left -= take
                if not self.left:
                    self.state = _DATA_END
                continue
            if state == _DATA_END:
                # The CRLF after a chunk's data, possibly split between reads.
                need = b"\r\n"[len(self.line):]
                got = data[pos:pos + len(need)]
                if need[:len(got)] != got:
                    raise ValueError("no CRLF after chunk data")
                pos += len(got)
                if len(got) < len(need):
                    self.line = b"\r"
                    continue
                self.line = b""
                self.state = _SIZE
                continue
            nl = data.find(b"\n", pos)
            if nl < 0:
                self.line += data[pos:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise ValueError("chunk line too long")
                break
            line = self.line + data[pos:nl + 1]
            self.line = b""
            pos = nl + 1
            if len(line) < 2 or line[-2] != 13:
                raise ValueError("bare LF in chunked framing")
            if len(line) > MAX_CHUNK_LINE:
                raise ValueError("chunk line too long")
            line = line[:-2]
            if state == _SIZE:
                match = _CHUNK_SIZE.fullmatch(line)
                if match is None:
                    raise ValueError("invalid chunk size line")
                self.left = int(match.group(1), 16)
                self.state = _DATA if self.left else _TRAILERS
            elif not line:          # _TRAILERS: the empty line ends the body
                return pieces, pos
            else:
                self.trailer_size += len(line)
                if self.trailer_size > MAX_HEAD or _TRAILER.fullmatch(line) is None:
                    raise ValueError("invalid trailer section")
        return pieces, -1


def interim_head(status: int, reason: bytes) -> bytes:
    """A 1xx response as relayed to an HTTP/1.1 client."""
    return b"HTTP/1.1 %d %s\r\n\r\n" % (status, reason or b"Continue")


def _drop_named(fwd: list[bytes], names: tuple[bytes, ...]) -> list[bytes]:
    """``fwd`` without the headers a Connection header declared hop-by-hop.

    ``fwd`` holds slot 0 for the status line, then name, ": ", value, CRLF
    for every header that is not hop-by-hop.
    """
    kept = [fwd[i + j] for i in range(1, len(fwd), 4)
            if fwd[i].lower() not in names for j in range(4)]
    kept.insert(0, b"")
    return kept


def switching_head(reason: bytes, fwd: list[bytes], special: list[tuple[bytes, bytes]]) -> bytes:
    """A 101 Switching Protocols as sent to the client, with its Upgrade.

    ``fwd`` and ``special`` as for final_head.
    """
    upgrade = b""
    extra_hop: tuple[bytes, ...] = ()
    for lname, value in special:
        if lname == b"connection":
            if value.lower() not in PLAIN_CONNECTION:
                extra_hop += _connection_tokens(value)
        elif lname == b"upgrade":
            upgrade = value
    lines = _drop_named(fwd, extra_hop) if extra_hop else fwd
    lines[0] = b"HTTP/1.1 101 %s\r\n" % reason
    lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade, b"\r\n\r\n")
    return b"".join(lines)


# What final_head decides about the body, beside the head itself.
BODY_NONE: Final = 0           # HEAD, 204, 304: nothing follows the head
BODY_LENGTH: Final = 1         # Content-Length from the server, passed as is
BODY_CHUNKED: Final = 2        # chunked from the server, chunked to the client
BODY_UNTIL_CLOSE: Final = 3    # until the server closes; chunked to HTTP/1.1 clients


def final_head(status: int, reason: bytes, fwd: list[bytes],
                  special: list[tuple[bytes, bytes]], method: bytes, version: str,
                  keep_alive: bool) -> tuple[bytes, int, int, bool, bool]:
    """A final (>= 200) response head as sent to the client.

    ``fwd`` holds slot 0 for the status line, then name, ": ", value, CRLF
    for every header that is not hop-by-hop; ``special`` the lowered
    hop-by-hop and framing headers (RESPONSE_SPECIAL). ``keep_alive`` says
    whether the client connection may stay open (the client asked for it and
    the proxy is not stopping). Returns ``(head, body, length, chunked_out,
    keep_alive)``: ``body`` one of the BODY_* values, ``length`` the
    Content-Length (-1 if none), ``chunked_out`` whether the proxy chunks the
    body to the client, ``keep_alive`` the decision as written in the head.
    """
    length_value = None
    chunked = False
    extra_hop: tuple[bytes, ...] = ()
    for lname, value in special:
        if lname == b"content-length":
            length_value = value
        elif lname == b"transfer-encoding":
            chunked = True
        elif lname == b"connection":
            if value.lower() not in PLAIN_CONNECTION:
                extra_hop += _connection_tokens(value)
    lines = _drop_named(fwd, extra_hop) if extra_hop else fwd
    lines[0] = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    length = -1
    chunked_out = False
    if method == b"HEAD" or status == 204 or status == 304:
        body = BODY_NONE
    elif chunked:
        body = BODY_CHUNKED
        if version == "1.1":
            lines.append(b"Transfer-Encoding: chunked\r\n")
            chunked_out = True
        else:
            keep_alive = False
    elif length_value is not None:
        body = BODY_LENGTH
        length = int(length_value)
    else:
        body = BODY_UNTIL_CLOSE
        if version == "1.1":
            lines.append(b"Transfer-Encoding: chunked\r\n")
            chunked_out = True
        else:
            keep_alive = False
    if not keep_alive:
        lines.append(b"Connection: close\r\n\r\n")
    elif version == "1.0":
        lines.append(b"Connection: keep-alive\r\n\r\n")
    else:
        lines.append(b"\r\n")
    return b"".join(lines), body, length, chunked_out, keep_alive
