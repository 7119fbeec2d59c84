"""The Debian package under a real systemd: a container of each Debian
release (12 bookworm with systemd 252, 13 trixie with systemd 257) booted with
systemd-nspawn, the .deb built for that release installed in it, and the
service driven with systemctl the way an operator would.

The steps build on each other (install, start, reload, failed reload,
notify-reload on trixie, journal, watchdog, upgrade, stop, remove, purge), so
they are one module sharing one container per release, in file order. The
container has a private network: all traffic is on its loopback interface.
See conftest.py for how it is booted and cleaned.
"""

from __future__ import annotations

import json
import re
import time
import tomllib

import pytest

from .helpers import REPO, UPGRADE_VERSION, Container, Load, parse_show_proc

UNIT = "hapymaster.service"
CONFIG = "/etc/hapymaster/hapymaster.yaml"
SOCKET = "/run/hapymaster/master.sock"
MARKER = "hapymaster-nspawn-origin"
DROPIN_DIR = "/etc/systemd/system/hapymaster.service.d"
NOTIFY_RELOAD_EXAMPLE = "/usr/share/doc/hapymaster/examples/notify-reload.conf"
# Releases whose systemd has Type=notify-reload (>= 253).
NOTIFY_RELOAD_SUITES = {"trixie"}
# The modules built by Cython (setup.py).
COMPILED = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hapymaster"]["compiled"]

pytestmark = pytest.mark.timeout(600)


def show_proc(c: Container):
    out = c.run(["hapymaster", "ctl", "-S", SOCKET, "show proc"]).stdout
    procs = parse_show_proc(out)
    assert procs, out
    return procs, out


def current_workers(c: Container) -> set[int]:
    procs, _ = show_proc(c)
    return {p.pid for p in procs if p.type == "worker" and p.section == "workers"}


def master_reloads(c: Container) -> tuple[int, int]:
    """The master's own counters from ``show proc``: (reloads done, reloads failed)."""
    procs, text = show_proc(c)
    master = [p for p in procs if p.type == "master"]
    counts = re.fullmatch(r"(\d+) \[failed: (\d+)\]", master[0].reloads) if master else None
    assert counts, text
    return int(counts.group(1)), int(counts.group(2))


def journal_cursor(c: Container) -> str:
    """Where the journal ends now (exact, unlike --since's whole seconds)."""
    out = c.run(["journalctl", "-n", "1", "--show-cursor", "--no-pager", "-q"]).stdout
    last = out.strip().splitlines()[-1]
    assert last.startswith("-- cursor: "), out
    return last.removeprefix("-- cursor: ")


def journal_after(c: Container, cursor: str) -> str:
    return c.run(["journalctl", "-u", UNIT, "--no-pager", "-o", "cat",
                  f"--after-cursor={cursor}"]).stdout


def reloads_requested(c: Container, cursor: str) -> int:
    """How many reloads the master started after ``cursor`` (one journal line each)."""
    return len(re.findall(r"(?m)^(hard )?reload requested", journal_after(c, cursor)))


def timed_reload(c: Container) -> tuple[object, float]:
    """``systemctl reload``: its bound (the run's timeout) is what 'never hangs' means."""
    t0 = time.monotonic()
    reload = c.run(["systemctl", "reload", UNIT], timeout=90, check=False)
    return reload, time.monotonic() - t0


def main_pid(c: Container) -> int:
    return int(c.show(UNIT, "MainPID")["MainPID"])


def get(c: Container, path: str = "/", port: int = 80, attempts: int = 50) -> tuple[int, str]:
    """One HTTP GET inside the container, retried while the proxy comes up."""
    script = ("import sys, urllib.request, urllib.error\n"
              "try:\n"
              f"    r = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=5)\n"
              "    print(r.status); print(r.read().decode(errors='replace'))\n"
              "except urllib.error.HTTPError as e:\n"
              "    print(e.code); print(e.read().decode(errors='replace'))\n")
    status, body = 0, ""
    for _ in range(attempts):
        proc = c.run(["python3", "-c", script], check=False)
        if proc.returncode == 0:
            status_text, _, body = proc.stdout.partition("\n")
            status = int(status_text)
            if status == 200:
                break
        else:
            body = proc.stderr
        time.sleep(0.2)
    return status, body


def check_no_refused(result: dict, journal: str = "") -> None:
    """The contract: not one connection refused, and not one request lost,
    while workers are replaced."""
    counts = result["counts"]
    assert counts["ok"] > 0, (result, journal)
    assert counts["refused"] == 0, (result, journal)
    failed = sum(counts.values()) - counts["ok"]
    assert failed == 0, (f"{failed} of {sum(counts.values())} requests failed while the old "
                         f"workers soft-stopped: {result['errors']}", journal)


def unit_pids(c: Container) -> set[int]:
    """Every process in the service's cgroup, as the container sees them."""
    group = c.show(UNIT, "ControlGroup")["ControlGroup"]
    if not group:
        return set()
    out = c.sh(f"cat /sys/fs/cgroup/unified{group}/cgroup.procs 2>/dev/null"
               f" || cat /sys/fs/cgroup{group}/cgroup.procs 2>/dev/null || true").stdout
    return {int(p) for p in out.split()}


def pids_named(c: Container, name: str) -> set[int]:
    """The processes of the service's cgroup whose comm is ``name``."""
    pids = set()
    for pid in unit_pids(c):
        comm = c.sh(f"cat /proc/{pid}/comm 2>/dev/null || true").stdout.strip()
        if comm == name:
            pids.add(pid)
    return pids


def template_pids(c: Container) -> set[int]:
    """The worker template (fork server) processes in the service's cgroup."""
    return pids_named(c, "hapymaster-tmpl")


def spare_pids(c: Container) -> set[int]:
    """The template's spare intermediate process (forked 50 ms after a spawn)."""
    deadline = time.monotonic() + 10
    while not (found := pids_named(c, "hapymaster-fork")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_install_starts_and_enables_the_service(container: Container):
    c = container
    # The origin server the shipped example config points at (127.0.0.1:8000).
    c.sh(f"mkdir -p /srv/www && echo {MARKER} > /srv/www/index.html")
    c.run(["systemd-run", "--unit=origin", "--working-directory=/srv/www",
           "python3", "-m", "http.server", "--bind", "127.0.0.1", "8000"])

    t0 = time.monotonic()
    c.run(["dpkg", "-i", "/root/hapymaster.deb"], timeout=120)
    print(f"dpkg -i: {time.monotonic() - t0:.1f}s")

    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active", \
        c.run(["journalctl", "-u", UNIT, "--no-pager", "-n", "50"], check=False).stdout
    assert c.run(["systemctl", "is-enabled", UNIT], check=False).stdout.strip() == "enabled"
    passwd = c.run(["getent", "passwd", "hapymaster"]).stdout
    assert ":/nonexistent:/usr/sbin/nologin" in passwd, passwd
    assert CONFIG in c.run(["dpkg-query", "-W", "-f=${Conffiles}", "hapymaster"]).stdout
    assert c.sh("test -f /usr/share/man/man1/hapymaster.1.gz && "
                "test -f /usr/share/man/man5/hapymaster.yaml.5.gz", check=False).returncode == 0


def exposure(c: Container) -> float:
    out = c.run(["systemd-analyze", "security", "--no-pager", UNIT]).stdout
    level = float(out.strip().splitlines()[-1].split(":")[1].split()[0])
    print(f"{c.suite}: systemd-analyze security {UNIT}: {level}")
    return level


def test_unit_hardening_exposure_at_most_1_5(container: Container):
    assert exposure(container) <= 1.5


def test_start_is_type_notify_and_mainpid_is_the_master(container: Container):
    c = container
    c.run(["systemctl", "stop", UNIT], timeout=90)
    t0 = time.monotonic()
    c.run(["systemctl", "start", UNIT], timeout=90)
    print(f"systemctl start: {time.monotonic() - t0:.2f}s")
    props = c.show(UNIT, "Type", "NotifyAccess", "ActiveState", "SubState", "MainPID",
                   "ExecMainPID", "User", "WatchdogUSec", "NRestarts")
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    pid = int(props["MainPID"])
    assert pid > 0 and pid == int(props["ExecMainPID"]), props

    cmdline = c.sh(f"tr '\\0' ' ' < /proc/{pid}/cmdline").stdout
    assert "hapymaster -f /etc/hapymaster/hapymaster.yaml" in cmdline, cmdline
    procs, text = show_proc(c)
    masters = [p for p in procs if p.type == "master"]
    assert [p.pid for p in masters] == [pid], text
    workers = current_workers(c)
    assert workers, text
    # Master, its one worker template, the template's spare intermediate
    # process and the workers, nothing else, all in the unit's cgroup, all
    # as the package's user.
    templates, spares = template_pids(c), spare_pids(c)
    assert len(templates) == 1 and len(spares) == 1, (unit_pids(c), text)
    assert unit_pids(c) == {pid} | workers | templates | spares, (unit_pids(c), text)
    for p in {pid} | workers | templates | spares:
        assert c.sh(f"stat -c %U /proc/{p}").stdout.strip() == "hapymaster"


def test_traffic_flows_through_the_installed_config(container: Container):
    status, body = get(container)
    assert status == 200 and MARKER in body, (status, body)
    status, body = get(container, "/;csv", port=8404, attempts=10)
    assert status == 200 and "app1" in body, (status, body)


def test_workers_run_the_compiled_hot_path(container: Container):
    """The installed workers have the Cython-built modules mapped, not their .py."""
    workers = current_workers(container)
    assert workers
    for pid in workers:
        maps = container.sh(f"cat /proc/{pid}/maps").stdout
        for name in COMPILED:
            path = name.replace(".", "/")
            assert re.search(rf"/{path}\.cpython-\d+-\S+\.so$", maps, re.M), (pid, name)


def check_one_blocking_reload(c: Container, tmp_path) -> None:
    """One ``systemctl reload``: exactly one reload of the master, finished (new
    workers serving) when systemctl returns, same MainPID, nothing refused."""
    pid, before = main_pid(c), current_workers(c)
    done, failed = master_reloads(c)
    cursor = journal_cursor(c)
    load = Load(c, tmp_path, MARKER)
    time.sleep(1.0)
    reload, took = timed_reload(c)
    after = current_workers(c)  # right away: the reload is over when systemctl returns
    time.sleep(1.0)
    result = load.finish()
    print(f"{c.suite}: systemctl reload ({c.show(UNIT, 'Type')['Type']}): "
          f"rc={reload.returncode} in {took:.2f}s; load during it: {result}")
    assert reload.returncode == 0, reload.stderr
    assert master_reloads(c) == (done + 1, failed)
    assert reloads_requested(c, cursor) == 1
    assert main_pid(c) == pid
    assert after and not after & before, (before, after)
    # The superseded generation finishes its connections and leaves.
    deadline = time.monotonic() + 15
    while unit_pids(c) & before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not unit_pids(c) & before, (before, unit_pids(c))
    check_no_refused(result)


def test_reload_is_blocking_keeps_mainpid_and_refuses_nothing(container: Container, tmp_path):
    check_one_blocking_reload(container, tmp_path)


def check_broken_config_fails_the_reload(c: Container) -> None:
    pid, before = main_pid(c), current_workers(c)
    done, failed = master_reloads(c)
    c.sh(f"cp {CONFIG} /root/good.yaml && printf '\\nbogus_top_level_key: 1\\n' >> {CONFIG}")
    try:
        cursor = journal_cursor(c)
        reload, took = timed_reload(c)
        print(f"{c.suite}: broken config: systemctl reload rc={reload.returncode} in {took:.2f}s")
        assert reload.returncode != 0, "a reload with a broken config must fail"
        props = c.show(UNIT, "ActiveState", "SubState")
        assert props == {"ActiveState": "active", "SubState": "running"}, props
        assert master_reloads(c) == (done, failed + 1)
        assert reloads_requested(c, cursor) == 1
        assert main_pid(c) == pid
        assert current_workers(c) == before
        status, body = get(c, attempts=1)
        assert status == 200 and MARKER in body, (status, body)
        journal = journal_after(c, cursor)
        assert "bogus_top_level_key" in journal, journal
        status_text = c.run(["systemctl", "status", "--no-pager", "-n", "20", UNIT],
                            check=False).stdout
        print(status_text)
        assert "bogus_top_level_key" in status_text, status_text
    finally:
        c.sh(f"cp /root/good.yaml {CONFIG}")
    assert c.run(["systemctl", "reload", UNIT], timeout=90, check=False).returncode == 0


def test_broken_config_fails_the_reload_and_keeps_serving(container: Container):
    check_broken_config_fails_the_reload(container)


def use_dropin(c: Container, text: str | None) -> None:
    """Put ``text`` as the unit's only local drop-in (None: none), and restart:
    a running service does not change its Type= on daemon-reload."""
    script = f"rm -rf {DROPIN_DIR}"
    if text is not None:
        script += f" && mkdir -p {DROPIN_DIR} && cat > {DROPIN_DIR}/test.conf"
    c.run(["sh", "-c", script], input=text or "")
    c.run(["systemctl", "daemon-reload"])
    # These restarts come faster than the default start limit (5 in 10 s) allows.
    c.run(["systemctl", "reset-failed", UNIT])
    c.run(["systemctl", "restart", UNIT], timeout=90)


@pytest.fixture
def notify_reload(container: Container):
    """The shipped notify-reload drop-in installed (trixie only), removed after."""
    c = container
    if c.suite not in NOTIFY_RELOAD_SUITES:
        version = c.run(["systemctl", "--version"]).stdout.split()[1]
        pytest.skip(f"{c.suite} has systemd {version}: no Type=notify-reload (>= 253)")
    try:
        use_dropin(c, c.run(["cat", NOTIFY_RELOAD_EXAMPLE]).stdout)
        yield c
    finally:
        use_dropin(c, None)
        assert c.show(UNIT, "Type")["Type"] == "notify"


def test_notify_reload_dropin_reloads_once_and_fails_on_a_broken_config(notify_reload, tmp_path):
    """The shipped variant: Type=notify-reload, ReloadSignal=SIGCONT and the
    unit's blocking ExecReload= (see systemd/notify-reload.conf for why)."""
    c = notify_reload
    props = c.show(UNIT, "Type", "ReloadSignal", "ExecReload", "NotifyAccess")
    assert props["Type"] == "notify-reload" and props["ReloadSignal"] == "18", props
    assert "hapymaster reload" in props["ExecReload"] and props["NotifyAccess"] == "main", props
    assert exposure(c) <= 1.5
    check_one_blocking_reload(c, tmp_path)
    check_broken_config_fails_the_reload(c)
    # A reload the master starts by itself (here: the CLI directly) is one
    # reload too, and systemd follows it (RELOADING=1 ... READY=1) back to running.
    done, failed = master_reloads(c)
    c.run(["hapymaster", "reload", "-S", SOCKET], timeout=90)
    assert master_reloads(c) == (done + 1, failed)
    deadline = time.monotonic() + 10
    while c.show(UNIT, "SubState")["SubState"] != "running" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert c.show(UNIT, "SubState")["SubState"] == "running"


def test_notify_reload_traps_the_shipped_dropin_avoids(notify_reload):
    """What systemd 257 does with the two obvious variants, and so why the
    shipped one is what it is: SIGHUP *and* ExecReload= reload twice; SIGHUP
    without ExecReload= reloads once but reports success on a broken config."""
    c = notify_reload
    use_dropin(c, "[Service]\nType=notify-reload\nReloadSignal=SIGHUP\n")
    done, failed = master_reloads(c)
    cursor = journal_cursor(c)
    reload, _ = timed_reload(c)
    assert reload.returncode == 0, reload.stderr
    assert master_reloads(c) == (done + 2, failed), "SIGHUP and ExecReload=: two reloads"
    assert reloads_requested(c, cursor) == 2

    use_dropin(c, "[Service]\nType=notify-reload\nReloadSignal=SIGHUP\nExecReload=\n")
    done, failed = master_reloads(c)
    reload, _ = timed_reload(c)
    assert reload.returncode == 0 and master_reloads(c) == (done + 1, failed)
    c.sh(f"cp {CONFIG} /root/good.yaml && printf '\\nbogus_top_level_key: 1\\n' >> {CONFIG}")
    try:
        reload, _ = timed_reload(c)
        assert master_reloads(c) == (done + 1, failed + 1)
        assert reload.returncode == 0, "without ExecReload= a failed reload reports success"
    finally:
        c.sh(f"cp /root/good.yaml {CONFIG}")


FD_STORE_DROPIN = ("[Service]\nFileDescriptorStoreMax=16\n"
                   # systemd >= 254 sets FDSTORE= itself; 252 needs it said
                   "Environment=FDSTORE=16\n")


def test_fd_store_restart_and_crash_refuse_no_client(container: Container, tmp_path):
    """With the fd store, the listening sockets outlive the master: clients
    connecting through ``systemctl restart`` and through a SIGKILL of the
    master wait in the backlog for the next one; none is refused."""
    c = container
    use_dropin(c, FD_STORE_DROPIN)
    try:
        stored = c.show(UNIT, "NFileDescriptorStore").get("NFileDescriptorStore")
        if stored is not None:           # the property exists on both releases' systemd
            assert int(stored) >= 2, stored   # :80 and the stats :8404
        load = Load(c, tmp_path, MARKER)
        time.sleep(1.0)
        first = main_pid(c)
        c.run(["systemctl", "restart", UNIT], timeout=90)
        second = main_pid(c)
        time.sleep(1.0)
        result = load.finish()
        print(f"{c.suite}: systemctl restart with the fd store: {result}")
        assert second != first
        check_no_refused(result)

        load = Load(c, tmp_path, MARKER)
        time.sleep(1.0)
        c.run(["systemctl", "kill", "--kill-whom=main", "--signal=SIGKILL", UNIT])
        deadline = time.monotonic() + 30    # Restart=on-failure, RestartSec=2s
        while time.monotonic() < deadline:
            props = c.show(UNIT, "ActiveState", "SubState", "MainPID")
            if props["SubState"] == "running" and int(props["MainPID"]) not in (0, second):
                break
            time.sleep(0.2)
        assert props["SubState"] == "running", props
        time.sleep(1.0)
        result = load.finish()
        print(f"{c.suite}: SIGKILL of the master with the fd store: {result}")
        # Requests in flight on the killed generation may be cut (its workers
        # die with the master); what matters is that no connect is refused.
        assert result["counts"]["refused"] == 0, result
        assert result["counts"]["ok"] > 0, result
    finally:
        c.run(["systemctl", "reset-failed", UNIT], check=False)
        use_dropin(c, None)


def test_socket_activation_serves_a_client_that_came_while_stopped(container: Container):
    """The shipped hapymaster.socket: systemd holds the config's addresses;
    a connection made while the service is stopped starts it and is served."""
    c = container
    c.run(["systemctl", "stop", UNIT], timeout=90)
    try:
        c.run(["systemctl", "start", "hapymaster.socket"])
        assert c.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
        script = ("import socket\n"
                  "s = socket.create_connection(('127.0.0.1', 80), timeout=20)\n"
                  "s.sendall(b'GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n')\n"
                  "data = b''\n"
                  "while True:\n"
                  "    chunk = s.recv(65536)\n"
                  "    if not chunk: break\n"
                  "    data += chunk\n"
                  "print(data.decode(errors='replace'))\n")
        answer = c.run(["python3", "-c", script], timeout=60).stdout
        assert answer.startswith("HTTP/1.1 200") and MARKER in answer, answer
        props = c.show(UNIT, "ActiveState", "SubState")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        # The master took systemd's sockets: it bound none of them itself.
        journal = c.run(["journalctl", "-u", UNIT, "-n", "50", "--no-pager"]).stdout
        assert "cannot bind" not in journal, journal
        status, body = get(c, "/;csv", port=8404, attempts=10)
        assert status == 200, (status, body)
    finally:
        c.run(["systemctl", "stop", "hapymaster.socket", UNIT], timeout=90, check=False)
        c.run(["systemctl", "reset-failed", UNIT], check=False)
        c.run(["systemctl", "start", UNIT], timeout=90)


def test_journal_has_structured_fields(container: Container):
    out = container.run(["journalctl", "-u", UNIT, "-o", "json", "--no-pager"]).stdout
    entries = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    roles = {e.get("HAPYMASTER_ROLE") for e in entries}
    assert {"master", "worker"} <= roles, roles
    master = [e for e in entries if e.get("HAPYMASTER_ROLE") == "master"]
    assert all("HAPYMASTER_PID" in e for e in master)


def test_watchdog_is_fed(container: Container):
    """With a short WatchdogSec the master must keep pinging, or systemd kills it."""
    c = container
    c.sh("mkdir -p /run/systemd/system/hapymaster.service.d && printf "
         "'[Service]\\nWatchdogSec=2s\\n' > /run/systemd/system/hapymaster.service.d/wd.conf")
    try:
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "restart", UNIT], timeout=90)
        pid = main_pid(c)
        assert c.show(UNIT, "WatchdogUSec")["WatchdogUSec"] == "2s"
        time.sleep(5)
        props = c.show(UNIT, "ActiveState", "MainPID", "NRestarts", "Result")
        assert props == {"ActiveState": "active", "MainPID": str(pid), "NRestarts": "0",
                         "Result": "success"}, props
    finally:
        c.sh("rm -rf /run/systemd/system/hapymaster.service.d")
        c.run(["systemctl", "daemon-reload"])
        c.run(["systemctl", "restart", UNIT], timeout=90)


def test_upgrade_reloads_into_new_code_and_keeps_the_conffile(container: Container, tmp_path):
    c = container
    c.sh(f"printf '# local change kept on upgrade\\n' >> {CONFIG}")
    pid, before = main_pid(c), current_workers(c)
    load = Load(c, tmp_path, MARKER)
    time.sleep(1.0)
    upgrade = c.run(["dpkg", "-i", "/root/hapymaster-upgrade.deb"], timeout=120, check=False)
    time.sleep(1.0)
    result = load.finish()
    print(f"upgrade to {UPGRADE_VERSION}: rc={upgrade.returncode}; load during it: {result}")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    assert "local change kept on upgrade" in c.run(["cat", CONFIG]).stdout
    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active"
    # Reloaded, not restarted: the reload found another version installed and
    # re-executed the master in place (same MainPID, same sockets: nothing
    # refused below), which runs the new code, as its new workers do.
    assert main_pid(c) == pid
    procs, text = show_proc(c)
    [master] = [p for p in procs if p.type == "master"]
    assert master.pid == pid and master.version == UPGRADE_VERSION, text
    workers = [p for p in procs if p.type == "worker" and p.section == "workers"]
    assert workers and not {p.pid for p in workers} & before, text
    assert all(p.version == UPGRADE_VERSION for p in workers), text
    props = c.show(UNIT, "ActiveState", "MainPID")
    assert props == {"ActiveState": "active", "MainPID": str(pid)}, props
    # Asked for, without a new version: the same re-exec, through the master CLI.
    reexec = c.run(["hapymaster", "reload", "--upgrade", "-S", SOCKET], check=False)
    assert reexec.returncode == 0 and reexec.stdout.startswith("Success=1"), \
        reexec.stdout + reexec.stderr
    assert main_pid(c) == pid
    journal = c.run(["journalctl", "-u", UNIT, "--no-pager", "-n", "60"], check=False).stdout
    check_no_refused(result, journal)


def test_upgrade_with_an_invalid_config_keeps_the_service_running(container: Container):
    """An admin edited the config badly and never reloaded; then an upgrade
    comes: the reload fails, and a restart would fail too, so the postinst
    must leave the running service alone rather than take it down."""
    c = container
    pid, before = main_pid(c), current_workers(c)
    c.sh(f"cp {CONFIG} /root/good.yaml && printf 'bogus_top_level_key: 1\\n' >> {CONFIG}")
    try:
        # Reinstalling the same version runs the same postinst upgrade path.
        upgrade = c.run(["dpkg", "-i", "/root/hapymaster-upgrade.deb"], timeout=120, check=False)
        assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
        assert "is invalid" in upgrade.stderr, upgrade.stderr
        assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "active"
        assert main_pid(c) == pid and current_workers(c) == before
        status, body = get(c, attempts=1)
        assert status == 200 and MARKER in body, (status, body)
    finally:
        c.sh(f"cp /root/good.yaml {CONFIG}")


def test_stop_leaves_no_process(container: Container):
    c = container
    t0 = time.monotonic()
    c.run(["systemctl", "stop", UNIT], timeout=90)
    print(f"systemctl stop: {time.monotonic() - t0:.2f}s")
    assert c.run(["systemctl", "is-active", UNIT], check=False).stdout.strip() == "inactive"
    assert c.run(["pgrep", "-u", "hapymaster"], check=False).returncode == 1
    assert c.run(["pgrep", "-f", "hapymaster"], check=False).returncode == 1
    assert c.sh("test -e /run/hapymaster", check=False).returncode != 0


def test_remove_then_purge_leave_nothing_behind(container: Container):
    c = container
    c.run(["systemctl", "start", UNIT], timeout=90)
    c.run(["apt-get", "remove", "-y", "hapymaster"], timeout=120)
    assert c.run(["pgrep", "-u", "hapymaster"], check=False).returncode == 1
    assert c.sh("test -e /usr/bin/hapymaster || test -e /lib/systemd/system/hapymaster.service"
                " || test -e /usr/lib/python3/dist-packages/hapymaster", check=False).returncode != 0
    assert c.sh(f"test -f {CONFIG}", check=False).returncode == 0, "remove keeps the conffile"

    c.run(["apt-get", "purge", "-y", "hapymaster"], timeout=120)
    assert c.run(["dpkg-query", "-W", "hapymaster"], check=False).returncode != 0
    leftovers = c.sh("ls -d /etc/hapymaster /run/hapymaster /usr/lib/sysusers.d/hapymaster.conf "
                     "/etc/systemd/system/multi-user.target.wants/hapymaster.service "
                     "/var/lib/systemd/deb-systemd-helper-enabled/hapymaster.service.dsh-also "
                     "/var/lib/systemd/deb-systemd-helper-enabled/multi-user.target.wants/hapymaster.service "
                     "2>/dev/null", check=False).stdout
    assert leftovers == "", leftovers
    assert c.run(["systemctl", "list-unit-files", "--no-legend", UNIT],
                 check=False).stdout.strip() == ""
    # Debian policy keeps a package's system user on purge (files with its uid
    # may remain, e.g. in backups); it must own nothing left on disk.
    owned = c.sh("find / -xdev -user hapymaster 2>/dev/null | head", check=False).stdout
    assert owned == "", owned
