"""The worker: the process that carries all client traffic.

Started by the master with ``python -m hapymaster.worker``; it inherits the
listening sockets and a control socketpair, binds nothing, and serves until
told to leave. One module per concern:

- ``__main__``  process entry: boot message, privileges, event loop, READY;
  hands the protocol factories of each mode to the listeners
- ``process``   the Worker: listeners, maxconn, timeouts sweeper, soft/hard stop
- ``control``   the socketpair to the master (cli, gather, READY)
- ``balance``   backends and servers at runtime: algorithms, queue, counters
- ``pool``      idle keep-alive server connections, per server
- ``exchange``  ``Phase`` of a client connection, read-pause reasons, one
  request/response ``Exchange``
- ``h1``        HTTP/1.x rules without I/O: hop-by-hop headers, framing, the
  heads as forwarded (bytes in, bytes out)
- ``proxy_http`` the HTTP client connection: parsing, routing, the exchange's
  phases, errors, counters and the access log call
- ``server_conn`` the HTTP server connection: parses responses for its client
- ``proxy_tcp`` the TCP relay
- ``errors``    the small HAProxy-like error pages
- ``checks``    health checks
- ``stats``     CSV, HTML page, Prometheus metrics, the stats listener
- ``runtime``   the worker CLI commands and the state carried across reloads
- ``accesslog`` the access log: httplog/tcplog lines, batched per loop iteration to
  stderr, a file, journald or syslog; drops counted, never blocking
"""
