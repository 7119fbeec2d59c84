"""The small error responses the proxy itself sends, worded like HAProxy's."""

from __future__ import annotations

_MESSAGES = {
    400: ("Bad request", "Your browser sent an invalid request."),
    403: ("Forbidden", "Request forbidden by administrative rules."),
    405: ("Method Not Allowed", "A request was made of a resource using a request method "
                                "not supported by that resource."),
    408: ("Request Time-out", "Your browser didn't send a complete request in time."),
    413: ("Payload Too Large", "The request entity exceeds the maximum allowed size."),
    414: ("URI Too Long", "The request URI is longer than the server is willing to interpret."),
    431: ("Request Header Fields Too Large", "The request header section is too large."),
    500: ("Internal Server Error", "An internal server error occurred."),
    502: ("Bad Gateway", "The server returned an invalid or incomplete response."),
    503: ("Service Unavailable", "No server is available to handle this request."),
    504: ("Gateway Time-out", "The server didn't respond in time."),
}

REASONS = {code: reason for code, (reason, _) in _MESSAGES.items()}


def _render(code: int) -> bytes:
    reason, text = _MESSAGES[code]
    body = f"<html><body><h1>{code} {reason}</h1>\n{text}\n</body></html>\n".encode()
    head = (f"HTTP/1.1 {code} {reason}\r\n"
            f"content-length: {len(body)}\r\n"
            "cache-control: no-cache\r\n"
            "content-type: text/html\r\n"
            "connection: close\r\n\r\n").encode()
    return head + body


# Rendered once: an error on the hot path is one dict lookup and one write.
ERROR_RESPONSES = {code: _render(code) for code in _MESSAGES}
