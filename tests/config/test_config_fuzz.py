"""Fuzzing the config loader: whatever the text, a clear error or a Config.

An operator's typo must come back as ``FILE:LINE: message``, never as a
traceback from deep inside the parser (a crash in ``hapymaster -c`` or in a
reload is a crash in front of someone about to reload production). Two
generators, both seeded from the configs we ship (``packaging/examples``,
the embedded demo), kept in ``tests/config/corpus``:

- *structured*: documents built from the schema's own keys with values of
  every YAML kind, so the run explores the validator, not just YAML syntax;
- *mutated*: the shipped configs with bytes deleted, duplicated or swapped,
  so it explores the YAML layer and the line bookkeeping.

The CI run is bounded by ``max_examples`` (a few seconds); set
``HAPYMASTER_FUZZ_EXAMPLES`` for a longer run by hand (README, Reliability).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from hapymaster.config import EMBEDDED_CONFIG, Config, ConfigError, parse_config

REPO = Path(__file__).resolve().parents[2]
CORPUS = sorted((REPO / "tests" / "config" / "corpus").glob("*.yaml")) + \
    sorted((REPO / "packaging" / "examples").glob("*.yaml"))
SEEDS = [EMBEDDED_CONFIG] + [p.read_text() for p in CORPUS]
EXAMPLES = int(os.environ.get("HAPYMASTER_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get(
    "HAPYMASTER_FUZZ_EXAMPLES"), suppress_health_check=[HealthCheck.too_slow])
ERROR_LINE = re.compile(r"^fuzz\.yaml:\d+: \S")

KEYS = ["global", "defaults", "frontends", "backends", "name", "bind", "mode", "default_backend",
        "routes", "path_prefix", "host", "backend", "timeout", "connect", "client", "server",
        "check", "queue", "tunnel", "http_request", "http_keep_alive", "maxconn", "balance",
        "interval", "rise", "fall", "http", "expect", "servers", "address", "weight", "backup",
        "max_reloads", "workers", "ready_timeout", "hard_stop_after", "stats", "user", "group",
        "master_socket", "access_log", "x_forwarded_for", "trusted_proxies", "max_body_size",
        "bogus"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
    st.sampled_from(["", "5s", "500ms", "-1s", "1e9h", "0", "http", "tcp", "roundrobin",
                     "127.0.0.1:8080", "[::1]:80", ":80", "host:99999", "GET /health",
                     "200-399", "/api", "10.0.0.0/8", "::1", "a" * 300, "\u00e9", "0.0.0.0:0",
                     "*:80"]),
    st.text(max_size=20))


def _documents() -> st.SearchStrategy:
    values = st.recursive(SCALARS, lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.sampled_from(KEYS), inner, max_size=6)), max_leaves=30)
    return st.dictionaries(st.sampled_from(KEYS), values, max_size=5)


def _check(text: str) -> None:
    try:
        config = parse_config(text, "fuzz.yaml")
    except ConfigError as exc:
        assert exc.errors, "a ConfigError must carry at least one message"
        for error in exc.errors:
            assert ERROR_LINE.match(error), f"not FILE:LINE: message: {error!r}"
        return
    assert isinstance(config, Config)
    # A config that parses is one the workers can use: every route and
    # default_backend names a backend that exists.
    names = {b.name for b in config.backends}
    for frontend in config.frontends:
        assert frontend.default_backend in names
        assert all(r.backend in names for r in frontend.routes)


def test_the_seed_corpus_parses() -> None:
    """The corpus is real: a corpus of broken seeds would fuzz nothing useful."""
    for text in SEEDS:
        assert isinstance(parse_config(text, "seed.yaml"), Config)


@FUZZ
@given(_documents())
def test_structured_documents_give_a_config_or_file_line_errors(document) -> None:
    _check(yaml.safe_dump(document, allow_unicode=True))


@st.composite
def _mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        span = draw(st.integers(1, 12))
        action = draw(st.sampled_from(["delete", "duplicate", "replace", "insert"]))
        if action == "delete":
            text = text[:at] + text[at + span:]
        elif action == "duplicate":
            text = text[:at] + text[at:at + span] * 2 + text[at + span:]
        elif action == "replace":
            text = text[:at] + draw(st.text(min_size=1, max_size=span)) + text[at + span:]
        else:
            text = text[:at] + draw(st.sampled_from(
                [":", "-", "[", "{", "&a", "*a", "!!python/object:os.system", "\t", "\0",
                 "\n  ", "<<: *a", "%YAML 1.1\n", "'", '"', "? ", "|", "#"])) + text[at:]
    return text


@FUZZ
@given(_mutated())
def test_mutated_configs_give_a_config_or_file_line_errors(text: str) -> None:
    _check(text)
