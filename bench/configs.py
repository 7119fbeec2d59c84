"""The configs the bench generates: nginx (origin), hapymaster, HAProxy.

One hapymaster config and one HAProxy config, equivalent frontend for
frontend (see README.md "Equivalent configs"); the reload scenarios only
change the process layout (2 workers / 2 threads, HAProxy master-worker).
"""

from __future__ import annotations

import os
from pathlib import Path

from common import MIB, NGINX_PORT

HAPY_HTTP, HAPY_TCP, HAPY_HTTP_LOG = 18080, 18081, 18082
HAP_HTTP, HAP_TCP, HAP_HTTP_LOG, HAP_PROBE = 28080, 28081, 28082, 28099
# HAProxy's frontends with 'option splice-auto' (kernel splicing, as a
# performance-minded HAProxy user runs bulk and TCP traffic)
HAP_HTTP_SPLICE, HAP_TCP_SPLICE = 28083, 28084
# A second (third...) hapymaster of an A/B run (--ref A --ref B) listens on
# the same ports plus VARIANT_STEP * its index.
VARIANT_STEP = 100

SMALL_BODY = "hello from the origin: a small answer, about one hundred bytes long, for the req/s runs\n"
HARD_STOP_AFTER = "5s"             # both proxies: how long a soft-stopped worker may keep serving


def write_origin(wd: Path) -> Path:
    www = wd / "www"
    www.mkdir()
    block = os.urandom(MIB)
    (www / "1m").write_bytes(block)
    with open(www / "10m", "wb") as f:
        for _ in range(10):
            f.write(block)
    conf = wd / "nginx.conf"
    conf.write_text(f"""\
user root;
worker_processes 1;
daemon off;
master_process on;
pid {wd}/nginx.pid;
error_log {wd}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_body_temp_path {wd}/nginx-body;
    proxy_temp_path {wd}/nginx-proxy;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{NGINX_PORT} backlog=4096 reuseport;
        root {www};
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
        location = /upload {{ client_max_body_size 64m; return 200 "ok\\n"; }}
        location / {{ }}
    }}
}}
""")
    return conf


def hapymaster_access_log(sink: Path) -> str:
    """The global access-log sink when a logged frontend is configured: the ONE place to change it.

    Like with like: hapymaster sends its httplog lines as syslog datagrams to
    the same bench sink HAProxy's ``log`` line points at (``global.access_log``
    with ``target: syslog``), one datagram per request for both.
    """
    return f'  access_log: {{target: syslog, address: "{sink}"}}\n'


def write_hapymaster(wd: Path, workers: int = 1, log_sink: Path | None = None,
                     variant: int = 0) -> Path:
    """The config of hapymaster number ``variant`` of the run (its ports shifted by VARIANT_STEP)."""
    shift = VARIANT_STEP * variant
    suffix = f"-{variant}" if variant else ""
    logged = ""
    if log_sink is not None:
        logged = f"""\
  - name: fe_http_log
    bind: ["127.0.0.1:{HAPY_HTTP_LOG + shift}"]
    mode: http
    access_log: true
    default_backend: origin
"""
    conf = wd / f"hapymaster{suffix}.yaml"
    conf.write_text(f"""\
global:
  workers: {workers}
  master_socket: {wd}/master{suffix}.sock
  hard_stop_after: {HARD_STOP_AFTER}
{hapymaster_access_log(log_sink) if log_sink is not None else ""}defaults:
  mode: http
  timeout: {{connect: 5s, client: 30s, server: 30s, queue: 5s, tunnel: 1h, http_request: 10s}}
  maxconn: 10000
  access_log: false
frontends:
  - name: fe_http
    bind: ["127.0.0.1:{HAPY_HTTP + shift}"]
    mode: http
    default_backend: origin
  - name: fe_tcp
    bind: ["127.0.0.1:{HAPY_TCP + shift}"]
    mode: tcp
    default_backend: origin_tcp
{logged}backends:
  - name: origin
    mode: http
    balance: roundrobin
    servers:
      - {{name: nginx, address: "127.0.0.1:{NGINX_PORT}"}}
  - name: origin_tcp
    mode: tcp
    balance: roundrobin
    servers:
      - {{name: nginx, address: "127.0.0.1:{NGINX_PORT}"}}
""")
    return conf


def write_haproxy(wd: Path, nbthread: int = 1, log_sink: Path | None = None,
                  idle_close: bool = True) -> Path:
    headers = f"""\
    # soft stop (reload): an idle client connection is not closed under the
    # client; its next response gets 'Connection: close' (HAProxy >= 2.6)
    {"" if idle_close else "no "}option idle-close-on-response
    # the three headers hapymaster adds by default
    option forwardfor
    http-request set-header X-Forwarded-Proto http
    http-request add-header Forwarded "for=%[src];proto=http"
"""
    logged = ""
    if log_sink is not None:
        logged = f"""
frontend fe_http_log
    bind 127.0.0.1:{HAP_HTTP_LOG}
    log {log_sink} local0
    option httplog
{headers}    default_backend origin
"""
    conf = wd / "haproxy.cfg"
    conf.write_text(f"""\
global
    nbthread {nbthread}
    maxconn 9000
    # splice-auto reserves maxpipes pipes (2 fds each; default maxconn/4) on
    # top of 2 fds per connection: 9000/4 would need 22,518 fds, over this
    # machine's hard limit of 20,000. The bulk runs use at most 8 at a time.
    maxpipes 500
    hard-stop-after {HARD_STOP_AFTER}
    # no global 'log' line: only fe_http_log logs, like hapymaster's access_log

defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout queue 5s
    timeout tunnel 1h
    timeout http-request 10s
    timeout http-keep-alive 10s
    maxconn 9000

frontend fe_http
    bind 127.0.0.1:{HAP_HTTP}
{headers}    default_backend origin

backend origin
    balance roundrobin
    server nginx 127.0.0.1:{NGINX_PORT}

frontend fe_tcp
    mode tcp
    bind 127.0.0.1:{HAP_TCP}
    default_backend origin_tcp

backend origin_tcp
    mode tcp
    balance roundrobin
    server nginx 127.0.0.1:{NGINX_PORT}

# the same two with kernel splicing (the '-splice' scenarios)
frontend fe_http_splice
    bind 127.0.0.1:{HAP_HTTP_SPLICE}
    option splice-auto
{headers}    default_backend origin_splice

backend origin_splice
    option splice-auto
    balance roundrobin
    server nginx 127.0.0.1:{NGINX_PORT}

frontend fe_tcp_splice
    mode tcp
    bind 127.0.0.1:{HAP_TCP_SPLICE}
    option splice-auto
    default_backend origin_tcp_splice

backend origin_tcp_splice
    mode tcp
    option splice-auto
    balance roundrobin
    server nginx 127.0.0.1:{NGINX_PORT}
{logged}
# the reload scenarios ask this which process answers ("new worker serving")
frontend probe
    bind 127.0.0.1:{HAP_PROBE}
    http-request return status 200 content-type text/plain lf-string "%pid"
""")
    return conf
