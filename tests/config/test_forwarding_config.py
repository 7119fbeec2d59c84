"""trusted_proxies and the request head timeout, as the config parser reads them."""

from __future__ import annotations

import ipaddress

import pytest

from hapymaster.config import ConfigError, parse_config

BASE = """\
defaults:
  mode: http
{defaults}
frontends:
  - name: web
    bind: ["127.0.0.1:8080"]
    default_backend: app
{frontend}
backends:
  - name: app
    servers:
      - {{name: s1, address: "127.0.0.1:9001"}}
"""


def config(defaults: str = "", frontend: str = ""):
    return parse_config(BASE.format(defaults=defaults, frontend=frontend), "t.yaml")


def test_trusted_proxies_are_networks_with_their_line():
    fe = config(frontend='    trusted_proxies: ["10.0.0.0/8", "::1", "192.168.1.0/24"]'
                ).frontends[0]
    assert [n.network for n in fe.trusted_proxies] == [
        ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"),
        ipaddress.ip_network("192.168.1.0/24")]
    assert str(fe.trusted_proxies[0].where) == "t.yaml:8"
    assert config().frontends[0].trusted_proxies == ()


def test_trusted_proxies_from_defaults_and_overridden():
    fe = config(defaults='  trusted_proxies: ["10.0.0.0/8"]').frontends[0]
    assert [str(n.network) for n in fe.trusted_proxies] == ["10.0.0.0/8"]
    fe = config(defaults='  trusted_proxies: ["10.0.0.0/8"]',
                frontend="    trusted_proxies: []").frontends[0]
    assert fe.trusted_proxies == ()


@pytest.mark.parametrize("value, message", [
    ('["10.0.0.1/8"]', "has host bits set"),
    ('["not-a-net"]', "does not appear to be an IPv4 or IPv6 network"),
    ("10.0.0.0/8", "must be a list of CIDRs"),
    ("[8]", "expected a CIDR"),
])
def test_bad_trusted_proxies_are_errors_with_their_line(value, message):
    with pytest.raises(ConfigError) as info:
        config(frontend=f"    trusted_proxies: {value}")
    assert len(info.value.errors) == 1
    assert info.value.errors[0].startswith("t.yaml:8: frontend 'web'.trusted_proxies")
    assert message in info.value.errors[0]


def test_http_request_not_set_falls_back_to_timeout_client():
    t = config(defaults="  timeout: {client: 3s}").frontends[0].timeout
    assert t.http_request is None and t.head == 3.0
    t = config(defaults="  timeout: {client: 3s, http_request: 1s}").frontends[0].timeout
    assert t.http_request == 1.0 and t.head == 1.0
    assert config().frontends[0].timeout.head == 30.0
