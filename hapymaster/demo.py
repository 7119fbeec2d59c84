"""The demo origin servers of the embedded default config.

Two tiny HTTP servers on loopback that say who they are, so that a new user
running hapymaster with no config sees round robin at work:
``curl 127.0.0.1:8080`` answers "origin-1", then "origin-2", and so on.
"""

from __future__ import annotations

import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .config import EMBEDDED_DEMO_ORIGINS, parse_address


def handler_for(name: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"hapymaster-demo-{name}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/health":
                body = b"ok\n"
            else:
                forwarded = self.headers.get("X-Forwarded-For", "-")
                body = (f"Hello from {name}: you asked for {self.path} "
                        f"(X-Forwarded-For: {forwarded})\n").encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, format: str, *args: object) -> None:
            pass  # the proxy's access log says it all

    return Handler


def main() -> None:
    servers = []
    for name, address_text in EMBEDDED_DEMO_ORIGINS:
        address = parse_address(address_text)
        servers.append(ThreadingHTTPServer((address.host, address.port), handler_for(name)))
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    print("demo origins ready", flush=True)
    try:
        threads[0].join()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
