"""HTTP/1.x message rules, with no I/O: bytes and header lists in, bytes out.

What HAProxy keeps in ``h1.c`` and the proxy must decide for every message:
which headers are hop-by-hop, how a body is framed on each side, whether
the client connection stays open, and the heads as they are sent on. The
connection code (``proxy_http``) calls these; the tests call them directly.

The server side always speaks HTTP/1.1 with keep-alive. To the client, a
body is sent with the framing the server gave it, except a body delimited
by the server closing, which HTTP/1.1 clients get chunked (so that they
keep their connection) and HTTP/1.0 clients get with a close.
"""

from __future__ import annotations

# Limits in the spirit of HAProxy's tune.bufsize (16 kB): a request line
# longer than MAX_URL gets 414, a header section beyond MAX_HEAD or more than
# MAX_HEADERS fields gets 431.
MAX_URL = 8192
MAX_HEAD = 16384
MAX_HEADERS = 100

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

LAST_CHUNK = b"0\r\n\r\n"


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


def forwarding_headers(client_ip: str, x_forwarded_for: bool, x_forwarded_proto: bool,
                       forwarded: bool) -> bytes:
    """X-Forwarded-For/-Proto and Forwarded (RFC 7239), with the blank line that ends the head."""
    text = ""
    if x_forwarded_for:
        text += f"X-Forwarded-For: {client_ip}\r\n"
    if x_forwarded_proto:
        text += "X-Forwarded-Proto: http\r\n"
    if forwarded:
        node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
        text += f"Forwarded: for={node};proto=http\r\n"
    return (text + "\r\n").encode("latin-1")


def request_head(method: bytes, url: bytes, headers: list[tuple[bytes, bytes]], upgrade: bool,
                 forwarding: bytes) -> tuple[bytes, bytes, bool, bool]:
    """The request as sent to the server: ``(head, host, chunked, has_body)``.

    Hop-by-hop headers (and those named by Connection) are dropped, the
    framing is restated (a chunked body stays chunked), an Upgrade asked by
    the client is passed on, ``forwarding`` (see forwarding_headers) ends it.
    """
    lines = [method, b" ", url, b" HTTP/1.1\r\n"]
    extra_hop: tuple[bytes, ...] = ()
    upgrade_value = b""
    chunked = False
    length = None
    host = b""
    for name, value in headers:
        lname = name.lower()
        if lname in HOP_BY_HOP:
            if lname == b"connection":
                if value.lower() not in PLAIN_CONNECTION:
                    extra_hop += _connection_tokens(value)
            elif lname == b"transfer-encoding":
                chunked = True
            elif lname == b"upgrade":
                upgrade_value = value
            continue
        if lname == b"content-length":
            length = value
        elif lname == b"host":
            host = value
        lines += (name, b": ", value, b"\r\n")
    if extra_hop:
        extra_hop = tuple(t for t in extra_hop if t not in NEVER_HOP)
    if extra_hop:
        # Drop what the client's Connection header declared hop-by-hop.
        lines = [method, b" ", url, b" HTTP/1.1\r\n"]
        for name, value in headers:
            lname = name.lower()
            if lname not in HOP_BY_HOP and lname not in extra_hop:
                lines += (name, b": ", value, b"\r\n")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    has_body = chunked or (length is not None and length != b"0")
    if upgrade and upgrade_value:
        lines += (b"Connection: upgrade\r\nUpgrade: ", upgrade_value, b"\r\n")
    lines.append(forwarding)
    return b"".join(lines), host, chunked, has_body


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
BODY_NONE = 0           # HEAD, 204, 304: nothing follows the head
BODY_LENGTH = 1         # Content-Length from the server, passed as is
BODY_CHUNKED = 2        # chunked from the server, chunked to the client
BODY_UNTIL_CLOSE = 3    # until the server closes; chunked to HTTP/1.1 clients


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
