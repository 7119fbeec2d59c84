"""hapymaster.worker.h1: the HTTP/1 rules alone, bytes in, bytes out."""

from __future__ import annotations

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
