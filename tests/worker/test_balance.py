"""Balancing algorithms, weights, maxconn queueing, backup servers."""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import time

from hapymaster.worker.balance import DRAWS
from worker_harness import http_get, origin_of


def config(front: str, servers: list[str], balance: str = "roundrobin", backend_extra: str = "",
           defaults_extra: str = "") -> str:
    lines = ["defaults:", "  mode: http", "  access_log: false"]
    if defaults_extra:
        lines.append(defaults_extra)
    lines += ["frontends:", "  - name: web", f"    bind: [\"{front}\"]", "    default_backend: app",
              "backends:", "  - name: app", f"    balance: {balance}"]
    if backend_extra:
        lines.append(backend_extra)
    lines.append("    servers:")
    lines += [f"      - {server}" for server in servers]
    return "\n".join(lines) + "\n"


def srv(name: str, origin, **options) -> str:
    extra = "".join(f", {key}: {json.dumps(value)}" for key, value in options.items())
    return f"{{name: {name}, address: \"{origin.address}\"{extra}}}"


def test_roundrobin_smooth_weights(backend, bind, run_worker):
    a, b, c = backend("a"), backend("b"), backend("c")
    front = bind("web")
    run_worker(config(front, [srv("a", a, weight=5), srv("b", b), srv("c", c)]))
    seen = [origin_of(http_get(front)[2]) for _ in range(14)]
    # nginx's smooth weighted round robin: interleaved, not a burst of five.
    assert seen[:7] == ["a", "a", "b", "a", "c", "a", "a"]
    assert seen[7:] == seen[:7]


def test_leastconn_prefers_idle_server(backend, bind, run_worker):
    slow, fast = backend("slow"), backend("fast")
    front = bind("web")
    run_worker(config(front, [srv("slow", slow), srv("fast", fast)], balance="leastconn"))
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        long_one = pool.submit(http_get, front, "/delay/1.0")
        time.sleep(0.2)
        # While one request holds a server, every new one goes to the other.
        seen = [origin_of(http_get(front)[2]) for _ in range(4)]
        busy = origin_of(long_one.result()[2])
    other = "fast" if busy == "slow" else "slow"
    assert seen == [other] * 4


def test_source_is_stable_and_survives_a_server_leaving(backend, bind, run_worker):
    origins = [backend(name) for name in ("a", "b", "c")]
    front = bind("web")
    worker = run_worker(config(front, [srv(o.name, o) for o in origins], balance="source"))
    first = {origin_of(http_get(front)[2]) for _ in range(5)}
    assert len(first) == 1
    chosen = first.pop()
    other = next(o.name for o in origins if o.name != chosen)
    # Another server leaving does not move this client.
    assert worker.cli(f"disable server app/{other}") == "\n"
    assert {origin_of(http_get(front)[2]) for _ in range(3)} == {chosen}
    # Its own server leaving moves it; coming back brings it back.
    worker.cli(f"enable server app/{other}")
    worker.cli(f"disable server app/{chosen}")
    moved = {origin_of(http_get(front)[2]) for _ in range(3)}
    assert len(moved) == 1 and chosen not in moved
    worker.cli(f"enable server app/{chosen}")
    assert {origin_of(http_get(front)[2]) for _ in range(3)} == {chosen}


def test_first_fills_servers_in_order(backend, bind, run_worker):
    a, b = backend("a", delay=0.5), backend("b", delay=0.5)
    front = bind("web")
    run_worker(config(front, [srv("a", a, maxconn=2), srv("b", b, maxconn=2)], balance="first"))
    assert origin_of(http_get(front)[2]) == "a"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(http_get, front) for _ in range(4)]
        seen = collections.Counter(origin_of(f.result()[2]) for f in futures)
    assert seen == {"a": 2, "b": 2}


def test_random_two_choices_uses_every_server(backend, bind, run_worker):
    origins = [backend(name) for name in ("a", "b", "c")]
    front = bind("web")
    run_worker(config(front, [srv(o.name, o) for o in origins], balance="random"))
    seen = collections.Counter(origin_of(http_get(front)[2]) for _ in range(60))
    assert set(seen) == {"a", "b", "c"}
    assert min(seen.values()) >= 5


def test_weight_zero_gets_nothing(backend, bind, run_worker):
    a, b = backend("a"), backend("b")
    front = bind("web")
    run_worker(config(front, [srv("a", a), srv("b", b, weight=0)]))
    assert {origin_of(http_get(front)[2]) for _ in range(6)} == {"a"}


def test_server_maxconn_queues_then_serves(backend, bind, run_worker):
    a = backend("a", delay=0.3)
    front = bind("web")
    worker = run_worker(config(front, [srv("a", a, maxconn=1)]))
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(http_get, front) for _ in range(3)]
        statuses = [f.result()[0] for f in futures]
    assert statuses == [200, 200, 200]
    # One at a time: three 0.3 s requests take at least 0.9 s.
    assert time.monotonic() - started >= 0.85
    stat = worker.cli("show stat")
    row = next(line.split(",") for line in stat.splitlines() if line.startswith("app,BACKEND"))
    header = stat.splitlines()[0][2:].split(",")
    assert int(row[header.index("qmax")]) >= 1


def test_queue_timeout_gives_503(backend, bind, run_worker):
    a = backend("a", delay=1.0)
    front = bind("web")
    run_worker(config(front, [srv("a", a, maxconn=1)], defaults_extra="  timeout: {queue: 200ms}"))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(http_get, front)
        time.sleep(0.1)
        started = time.monotonic()
        status, _, body = http_get(front)
        waited = time.monotonic() - started
        assert first.result()[0] == 200
    assert status == 503 and b"No server is available" in body
    assert 0.15 <= waited < 0.9


def test_backup_only_when_all_active_down(backend, bind, run_worker):
    a, b, spare = backend("a"), backend("b"), backend("spare")
    front = bind("web")
    worker = run_worker(config(front, [srv("a", a), srv("b", b), srv("spare", spare, backup=True)]))
    assert {origin_of(http_get(front)[2]) for _ in range(6)} == {"a", "b"}
    worker.cli("disable server app/a")
    assert {origin_of(http_get(front)[2]) for _ in range(4)} == {"b"}
    worker.cli("set server app/b state maint")
    assert {origin_of(http_get(front)[2]) for _ in range(4)} == {"spare"}
    worker.cli("enable server app/a")
    assert {origin_of(http_get(front)[2]) for _ in range(4)} == {"a"}


def test_draws_are_uniform_and_a_forked_worker_draws_its_own():
    values = [DRAWS.fraction() for _ in range(20000)]
    assert all(0.0 <= v < 1.0 for v in values)
    quarters = collections.Counter(int(v * 4) for v in values)
    assert all(4500 < quarters[i] < 5500 for i in range(4)), quarters   # 5000 +- 8 sigma
    # Workers are forked from the template: without a new seed a child
    # would draw exactly what its parent draws next.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, repr(DRAWS.fraction()).encode())
        os._exit(0)
    os.close(write_end)
    child = float(os.read(read_end, 64))
    os.close(read_end)
    os.waitpid(pid, 0)
    assert child != DRAWS.fraction()


def test_counter_fields_name_every_counter_in_order():
    # Counters spells its fields out for the compiled code; the stats sum
    # COUNTER_FIELDS: the two lists must not drift apart.
    from hapymaster.worker.balance import COUNTER_FIELDS, Counters
    assert Counters.__mypyc_attrs__ == COUNTER_FIELDS   # the compiled class's own fields
    assert set(Counters().as_dict().values()) == {0}
