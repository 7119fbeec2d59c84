"""``hapymaster reload`` and ``ctl``, the clients systemd and scripts run: they
must not import the master, the config parser or PyYAML to send one line."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

from master_harness import ROOT, free_port, http_config

HEAVY = ["asyncio", "yaml", "hapymaster.config", "hapymaster.master", "hapymaster.mcli",
         "hapymaster.worker"]

PROBE = """\
import json, sys
from hapymaster import cli
code = cli.main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""


def run_client(*argv: str) -> tuple[int, str, set[str]]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True,
                         timeout=60)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    return report["code"], out.stdout, set(report["modules"])


def test_reload_and_ctl_import_almost_nothing(master_factory, http_backend):
    backend = http_backend("s1")
    master = master_factory(http_config(free_port(), [backend.address]))
    code, answer, modules = run_client("reload", "-S", master.socket_path)
    assert code == 0 and answer.startswith("Success=1"), answer
    assert not [name for name in HEAVY if name in modules], sorted(modules)
    # The reload as systemd runs it: not even argparse or the socket module.
    assert not {"argparse", "socket"} & modules, sorted(modules)
    code, answer, modules = run_client("ctl", "-S", master.socket_path, "show", "proc")
    assert code == 0 and "# workers" in answer
    assert not [name for name in HEAVY if name in modules], sorted(modules)


LAUNCHER = ROOT / "packaging" / "bin" / "hapymaster"


def launched_modules(script: str, *argv: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run a script as its shebang would and list what it imported (-X importtime).

    -S: without this venv's site, which imports `re` itself (the editable
    install's finder); the system python3 the package uses does not.
    """
    out = subprocess.run([sys.executable, "-S", "-X", "importtime", script, *argv],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:") and not line.endswith("package")}
    return out, imported


def test_the_packaged_command_imports_almost_nothing(master_factory, http_backend, tmp_path):
    """packaging/bin/hapymaster, the /usr/bin/hapymaster of the .deb, as ExecReload= runs it."""
    master = master_factory(http_config(free_port(), [http_backend("s1").address]))
    empty = tmp_path / "empty.py"
    empty.write_text("")
    _, interpreter = launched_modules(str(empty))   # what the interpreter imports anyway
    out, modules = launched_modules(str(LAUNCHER), "reload", "-S", master.socket_path)
    assert out.returncode == 0 and out.stdout.startswith("Success=1"), out.stdout + out.stderr
    added = modules - interpreter
    assert "hapymaster.cli" in added, sorted(added)
    assert not [name for name in [*HEAVY, "re", "argparse", "socket"] if name in added], \
        sorted(added)


def test_client_commands_flush_everything_before_their_quick_exit(master_factory, http_backend,
                                                                  tmp_path):
    """reload and ctl end with os._exit: their whole answer still reaches a pipe."""
    master = master_factory(http_config(free_port(), [http_backend("s1").address]))
    # Buffered output, as under systemd (this machine sets PYTHONUNBUFFERED).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=60,
                            env={**env, "PYTHONPATH": str(ROOT)})
    ok = run([sys.executable, str(LAUNCHER), "reload", "-S", master.socket_path])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("Success=1\n--\n") and ok.stdout.count("READY in") == 1, ok.stdout
    proc = run([sys.executable, str(LAUNCHER), "ctl", "-S", master.socket_path, "show", "proc"])
    assert proc.returncode == 0 and proc.stdout.startswith("#"), proc.stdout + proc.stderr
    assert proc.stdout == master.ctl("show proc"), proc.stdout
    gone = run([sys.executable, str(LAUNCHER), "reload", "-S", str(tmp_path / "none.sock")])
    assert gone.returncode == 1 and gone.stdout == "", gone.stdout
    assert gone.stderr.startswith("hapymaster: cannot reach the master at "), gone.stderr
    # The master's own command line is not cut short: --version, -c exit as usual.
    version = run([sys.executable, str(LAUNCHER), "--version"])
    assert version.returncode == 0 and version.stdout.startswith("hapymaster "), version


def test_reload_arguments_beyond_the_plain_forms_still_go_through_argparse(master_factory,
                                                                            http_backend):
    backend = http_backend("s1")
    master = master_factory(http_config(free_port(), [backend.address]))
    code, answer, modules = run_client("reload", "--hard", "-S", master.socket_path)
    assert code == 0 and answer.startswith("Success=1"), answer
    assert "argparse" not in modules
    code, answer, modules = run_client("reload", f"-S{master.socket_path}")
    assert code == 0 and answer.startswith("Success=1"), answer
    assert "argparse" in modules                  # the attached form: argparse reads it
    out = subprocess.run([sys.executable, "-m", "hapymaster", "reload", "-S"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "argument -S: expected one argument" in out.stderr
    out = subprocess.run([sys.executable, "-m", "hapymaster", "reload", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--hard" in out.stdout
