"""The worker: the process that carries all client traffic.

Started by the master with ``python -m hapymaster.worker``; it inherits the
listening sockets and a control socketpair, binds nothing, and serves until
told to leave. One module per concern:

- ``__main__``  process entry: boot message, privileges, event loop, READY
- ``process``   the Worker: listeners, maxconn, timeouts sweeper, stopping
- ``control``   the socketpair to the master (cli, gather, READY)
- ``balance``   backends and servers at runtime: algorithms, queue, counters
- ``proxy_tcp`` the TCP relay
- ``proxy_http`` the HTTP/1.1 reverse proxy
- ``checks``    health checks
- ``stats``     CSV, HTML page, Prometheus metrics, the stats listener
- ``runtime``   the worker CLI commands and the state carried across reloads
- ``accesslog`` httplog / tcplog lines
"""
