"""hapymaster: a master-worker TCP/HTTP load balancer run by systemd."""

__version__ = "0.1.0"
