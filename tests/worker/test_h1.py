"""hapymaster.worker.h1: the HTTP/1 rules alone, bytes in, bytes out."""

from __future__ import annotations

import pytest

from hapymaster.worker import h1

FWD = h1.forwarding_headers("10.0.0.1", True, True, True)


def response_parts(*headers: tuple[bytes, bytes]) -> tuple[list[bytes], list[tuple[bytes, bytes]]]:
    """What the server connection collects while parsing: fwd lines and the special headers."""
    fwd: list[bytes] = [b""]
    special = []
    for name, value in headers:
        lname = name.lower()
        if lname in h1.RESPONSE_SPECIAL:
            special.append((lname, value))
            if lname in h1.HOP_BY_HOP:
                continue
        fwd += (name, b": ", value, b"\r\n")
    return fwd, special


def test_forwarding_headers():
    assert FWD == (b"X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Proto: http\r\n"
                   b"Forwarded: for=10.0.0.1;proto=http\r\n\r\n")
    assert h1.forwarding_headers("::1", False, False, True) == \
        b'Forwarded: for="[::1]";proto=http\r\n\r\n'
    assert h1.forwarding_headers("::1", False, False, False) == b"\r\n"


def test_request_head_drops_hop_by_hop_and_what_connection_names():
    headers = [(b"Host", b"example.com"), (b"Connection", b"close, X-Secret, Host"),
               (b"X-Secret", b"s"), (b"Keep-Alive", b"300"), (b"TE", b"trailers"),
               (b"Accept", b"*/*"), (b"Content-Length", b"3")]
    head, host, chunked, has_body = h1.request_head(b"POST", b"/p?q=1", headers, False, FWD)
    assert head == (b"POST /p?q=1 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n"
                    b"Content-Length: 3\r\n" + FWD)
    assert host == b"example.com" and not chunked and has_body


def test_request_head_restates_chunked_and_passes_an_upgrade():
    headers = [(b"Host", b"h"), (b"Transfer-Encoding", b"chunked"),
               (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]
    head, _, chunked, has_body = h1.request_head(b"GET", b"/ws", headers, True, b"\r\n")
    assert head == (b"GET /ws HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert chunked and has_body
    # The same head without an upgrade asked: no Upgrade goes on.
    head, _, _, _ = h1.request_head(b"GET", b"/ws", headers, False, b"\r\n")
    assert b"Upgrade" not in head


def test_request_head_without_body():
    head, host, chunked, has_body = h1.request_head(b"GET", b"/", [(b"Content-Length", b"0")],
                                                    False, b"\r\n")
    assert head == b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n"
    assert host == b"" and not chunked and not has_body


def test_content_length():
    assert h1.content_length([(b"content-length", b"12")]) == 12
    assert h1.content_length([(b"Content-Length", b"5"), (b"Transfer-Encoding", b"chunked")]) == -1
    assert h1.content_length([(b"Host", b"x")]) == -1


def test_final_head_content_length_keep_alive():
    fwd, special = response_parts((b"Server", b"nginx"), (b"Content-Length", b"13"),
                                   (b"Connection", b"keep-alive"), (b"Keep-Alive", b"timeout=5"))
    head, body, length, chunked_out, keep_alive = h1.final_head(
        200, b"OK", fwd, special, b"GET", "1.1", True)
    assert head == b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 13\r\n\r\n"
    assert (body, length, chunked_out, keep_alive) == (h1.BODY_LENGTH, 13, False, True)


def test_final_head_closes_when_not_kept_and_says_keep_alive_to_http10():
    fwd, special = response_parts((b"Content-Length", b"2"))
    head, *_ = h1.final_head(200, b"OK", list(fwd), special, b"GET", "1.1", False)
    assert head.endswith(b"Content-Length: 2\r\nConnection: close\r\n\r\n")
    head, *_, keep_alive = h1.final_head(200, b"OK", list(fwd), special, b"GET", "1.0", True)
    assert head.endswith(b"Connection: keep-alive\r\n\r\n") and keep_alive


def test_final_head_chunked_to_http11_close_to_http10():
    fwd, special = response_parts((b"Transfer-Encoding", b"chunked"))
    head, body, _, chunked_out, keep_alive = h1.final_head(
        200, b"OK", list(fwd), special, b"GET", "1.1", True)
    assert head == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert body == h1.BODY_CHUNKED and chunked_out and keep_alive
    head, body, _, chunked_out, keep_alive = h1.final_head(
        200, b"OK", list(fwd), special, b"GET", "1.0", True)
    assert head == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
    assert not chunked_out and not keep_alive


def test_final_head_body_until_close():
    fwd, special = response_parts((b"Server", b"old"))
    head, body, _, chunked_out, keep_alive = h1.final_head(
        200, b"OK", list(fwd), special, b"GET", "1.1", True)
    # An HTTP/1.1 client keeps its connection: the body is chunked for it.
    assert head == b"HTTP/1.1 200 OK\r\nServer: old\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert body == h1.BODY_UNTIL_CLOSE and chunked_out and keep_alive
    head, body, _, chunked_out, keep_alive = h1.final_head(
        200, b"OK", list(fwd), special, b"GET", "1.0", True)
    assert head.endswith(b"Connection: close\r\n\r\n") and not keep_alive


def test_final_head_no_body_for_head_204_304():
    fwd, special = response_parts((b"Content-Length", b"100"))
    for status, method in ((200, b"HEAD"), (204, b"GET"), (304, b"GET")):
        head, body, length, chunked_out, _ = h1.final_head(
            status, b"X", list(fwd), special, method, "1.1", True)
        assert body == h1.BODY_NONE and length == -1 and not chunked_out
        assert head.startswith(b"HTTP/1.1 %d X\r\n" % status)


def test_final_head_drops_what_the_server_connection_header_names():
    fwd, special = response_parts((b"X-Internal", b"1"), (b"Connection", b"X-Internal"),
                                  (b"Content-Length", b"0"), (b"Date", b"today"))
    head, *_ = h1.final_head(200, b"OK", fwd, special, b"GET", "1.1", True)
    assert head == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nDate: today\r\n\r\n"


def test_switching_and_interim_heads():
    fwd, special = response_parts((b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
                                  (b"Sec-WebSocket-Accept", b"abc"))
    assert h1.switching_head(b"Switching Protocols", fwd, special) == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: abc\r\n"
        b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert h1.interim_head(100, b"") == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert h1.interim_head(103, b"Early Hints") == b"HTTP/1.1 103 Early Hints\r\n\r\n"


def test_chunk():
    assert b"".join(h1.chunk(b"x" * 26)) == b"1a\r\n" + b"x" * 26 + b"\r\n"


# --- the request as it arrives (RFC 9112 2-7): bytes in, decisions out ----------------------

def test_request_line():
    assert h1.request_line(b"GET / HTTP/1.1") == (b"GET", 0)
    assert h1.request_line(b"PURGE /x HTTP/1.0") == (b"PURGE", 0)
    assert h1.request_line(b"M!#$%&'*+^`|~ / HTTP/1.1") == (b"M!#$%&'*+^`|~", 0)
    assert h1.request_line(b"CONNECT h:443 HTTP/1.1") == (b"CONNECT", 405)
    for bad in (b"GET /", b"GET", b"", b"GE(T / HTTP/1.1", b"G\x7fET / HTTP/1.1",
                b"GET  / HTTP/1.1", b"GET / HTTP/2.0", b"GET / http/1.1", b" / HTTP/1.1",
                b"GET / HTTP/1.1 x"):
        assert h1.request_line(bad)[1] == 400, bad


def test_partial_head_error_answers_what_cannot_become_valid():
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nHost: x\r\n") == 0
    assert h1.partial_head_error(b"GET /lon") == 0
    assert h1.partial_head_error(b"GET /\r\n") == 400            # HTTP/0.9
    assert h1.partial_head_error(b"-X( / HTTP/1.1\r\n") == 400
    assert h1.partial_head_error(b"GET / HTTP/1.1\n") == 400     # bare LF
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: b\n") == 400
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: b\rc") == 400     # bare CR
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: b\r") == 0        # half a CRLF
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: b\x00") == 400
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: \tb\x80") == 0
    assert h1.partial_head_error(b"GET /" + b"a" * h1.MAX_URL) == 414
    assert h1.partial_head_error(b"GET / HTTP/1.1\r\nA: " + b"a" * h1.MAX_HEAD) == 431


def test_host_error():
    assert not h1.host_error(1, b"example.com:8080", "1.1")
    assert not h1.host_error(1, b"[::1]:80", "1.1")
    assert not h1.host_error(1, b"", "1.1")      # RFC 9112 3.2: allowed empty
    assert not h1.host_error(0, b"", "1.0")
    assert h1.host_error(0, b"", "1.1")
    assert h1.host_error(2, b"a", "1.1")
    assert h1.host_error(2, b"a", "1.0")
    for bad in (b"a b", b"a/b", b"a:b:c", b"[::1", b"a\tb"):
        assert h1.host_error(1, bad, "1.1"), bad


def decode(*reads: bytes) -> tuple[bytes, bytes]:
    """The body a chunked decoder gets out of ``reads``, and what follows it."""
    decoder = h1.ChunkedDecoder()
    body = b""
    for data in reads:
        pieces, end = decoder.feed(data)
        body += b"".join(pieces)
        if end >= 0:
            return body, data[end:]
    raise AssertionError("the body did not end")


@pytest.mark.parametrize("size_line", [b"5", b"5;name=value", b"5 ;name=value",
                                       b'5;a;b="q s"', b"5\t; ext", b"5 ; a = b ;c",
                                       b'5;x="a\\"b"', b"00005"])
def test_chunk_sizes_and_extensions(size_line):
    assert decode(size_line + b"\r\nhello\r\n0\r\n\r\nNEXT") == (b"hello", b"NEXT")


def test_chunked_split_at_every_byte_and_trailers_dropped():
    body = b"3;x=y\r\nabc\r\n10\r\n" + b"z" * 16 + b"\r\n0\r\nTrailer-A: 1\r\nB:\r\n\r\nGET"
    decoder = h1.ChunkedDecoder()
    out = b""
    for i in range(len(body)):
        pieces, end = decoder.feed(body[i:i + 1])
        out += b"".join(pieces)
        if end >= 0:
            break
    assert out == b"abc" + b"z" * 16 and body[i + 1:] == b"GET"


@pytest.mark.parametrize("bad", [b"5 \r\nhello\r\n", b"x\r\n", b"\r\n", b"5;\r\nhello\r\n",
                                 b"5;a=\r\nhello\r\n", b"5;a b\r\nhello\r\n", b"-5\r\n",
                                 b"5\nhello\r\n", b"5\r\nhelloXY", b"5\r\nhello\n0",
                                 b"1" * 16 + b"\r\n", b"0\r\nbad trailer\r\n\r\n",
                                 b"5\r\r\nhello\r\n"])
def test_chunked_framing_errors(bad):
    with pytest.raises(ValueError):
        decode(bad + b"0\r\n\r\n")


def test_request_head_keeps_codings_before_chunked():
    headers = [(b"Host", b"h"), (b"Transfer-Encoding", b"gzip, chunked")]
    head, _, chunked, has_body = h1.request_head(b"POST", b"/", headers, False, b"\r\n")
    assert head == b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    assert chunked and has_body
    # Two fields are one list (RFC 9110 5.3).
    headers = [(b"Host", b"h"), (b"Transfer-Encoding", b"gzip"),
               (b"transfer-encoding", b"chunked")]
    head, _, _, _ = h1.request_head(b"POST", b"/", headers, False, b"\r\n")
    assert b"\r\nTransfer-Encoding: gzip, chunked\r\n" in head


SKIP = h1.request_skip(True, True, True)
CLAIMS = [(b"Host", b"h"), (b"X-Forwarded-For", b"6.6.6.6"), (b"x-forwarded-for", b"7.7.7.7"),
          (b"X-Forwarded-Proto", b"https"), (b"Forwarded", b"for=6.6.6.6")]


def test_a_clients_forwarding_fields_are_replaced():
    head, _, _, _ = h1.request_head(b"GET", b"/", CLAIMS, False, FWD, SKIP)
    assert head == b"GET / HTTP/1.1\r\nHost: h\r\n" + FWD
    # A field the frontend does not write is the client's business: passed on.
    skip = h1.request_skip(True, False, False)
    head, _, _, _ = h1.request_head(b"GET", b"/", CLAIMS, False, b"\r\n", skip)
    assert b"X-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n" in head
    assert b"6.6.6.6, " not in head and b"7.7.7.7" not in head


def test_a_trusted_proxys_forwarding_fields_are_extended():
    head, _, _, _ = h1.request_head(b"GET", b"/", CLAIMS, False, FWD, SKIP, "10.0.0.1")
    assert head == (b"GET / HTTP/1.1\r\nHost: h\r\n"
                    b"X-Forwarded-For: 6.6.6.6, 7.7.7.7, 10.0.0.1\r\nX-Forwarded-Proto: https\r\n"
                    b"Forwarded: for=6.6.6.6, for=10.0.0.1;proto=http\r\n\r\n")
    # A trusted proxy that sent none: ours alone.
    head, _, _, _ = h1.request_head(b"GET", b"/", [(b"Host", b"h")], False, FWD, SKIP, "10.0.0.1")
    assert head == b"GET / HTTP/1.1\r\nHost: h\r\n" + FWD


def test_a_default_host_when_the_client_sent_none():
    head, host, _, _ = h1.request_head(b"GET", b"/", [], False, b"\r\n", SKIP, None, b"s:80")
    assert head == b"GET / HTTP/1.1\r\nHost: s:80\r\n\r\n" and host == b"s:80"
    head, _, _, _ = h1.request_head(b"GET", b"/", [(b"Host", b"h")], False, b"\r\n", SKIP,
                                    None, b"s:80")
    assert head == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
    assert h1.authority(b"http://user@Example.com:81/p?q") == b"Example.com:81"
    assert h1.authority(b"HTTPS://e.org") == b"e.org"
    assert h1.authority(b"/p") == b""


def test_host_error_fast_path_agrees_with_the_grammar():
    for good in (b"a", b"a:", b"a:80", b"127.0.0.1:18080", b"x-y.z_~%41", b"[::1]", b":80"):
        assert not h1.host_error(1, good, "1.1"), good
    for bad in (b"a:b", b"a:80:80", b":80:", b"a@b", b"a:8 0"):
        assert h1.host_error(1, bad, "1.1"), bad


def test_an_absolute_form_targets_authority_replaces_the_host():
    # RFC 9112 3.2.2: a proxy generates Host from an absolute-form target.
    headers = [(b"Host", b"other"), (b"Accept", b"*/*")]
    head, host, _, _ = h1.request_head(b"GET", b"http://e.org:81/p", headers, False, b"\r\n",
                                       SKIP, None, b"", b"e.org:81")
    assert head == b"GET http://e.org:81/p HTTP/1.1\r\nAccept: */*\r\nHost: e.org:81\r\n\r\n"
    assert host == b"e.org:81"
    # The same when a Connection header makes the head be built again.
    headers.append((b"Connection", b"X-A"))
    head, _, _, _ = h1.request_head(b"GET", b"http://e.org:81/p", headers, False, b"\r\n",
                                    SKIP, None, b"s:80", b"e.org:81")
    assert head.count(b"Host:") == 1 and b"Host: e.org:81\r\n" in head


@pytest.mark.parametrize("value, bad", [
    (b"chunked", False), (b"gzip, chunked", False), (b"gzip,chunked", False),
    (b"gzip;q=1, chunked", False), (b'x;a="b c", chunked', False), (b" , chunked", False),
    (b"ncoding: chunked", True), (b"chunked, gzip", True), (b"chunked, chunked", True),
    (b"gz ip", True), (b"", True), (b"gzip;q", True),
])
def test_transfer_coding_syntax(value, bad):
    """A Transfer-Encoding field llhttp would take as chunked only by its last word."""
    assert h1.transfer_coding_error(value) is bad
