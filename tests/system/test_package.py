"""The .deb and the unit, checked without booting anything: lintian clean,
the right files and dependencies, and the unit's hardening score. The package
tests run once per suite (conftest.py), on the .deb built in that suite's chroot."""

from __future__ import annotations

import re
import shutil
import tomllib

import pytest

from .helpers import REPO, DebPackages, run

IN_CHROOT = str(REPO / "packaging" / "in-chroot")
# The release's own Python, which the package is built against.
PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
TOOL = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hapymaster"]
COMPILED = TOOL["compiled"]
COMPILED_LIBRARY = TOOL["compiled_library"]


def test_lintian_reports_no_error_and_no_warning(deb_packages: DebPackages):
    """The lintian of the release the package is built for, in its build chroot."""
    debs = deb_packages
    inside = debs.chroot / "tmp" / debs.current.name
    shutil.copy2(debs.current, inside)
    version = run([IN_CHROOT, str(debs.chroot), "dpkg-query", "-W", "-f=${Version}",
                   "lintian"]).stdout
    print(f"{debs.suite}: lintian {version}")
    proc = run([IN_CHROOT, str(debs.chroot), "lintian", "--fail-on", "error,warning",
                f"/tmp/{debs.current.name}"], timeout=300, check=False)
    tags = [line for line in proc.stdout.splitlines() if line[:2] in ("E:", "W:")]
    print(proc.stdout)
    assert proc.returncode == 0 and not tags, proc.stdout + proc.stderr


def test_package_contents_and_dependencies(deb_packages: DebPackages):
    deb = str(deb_packages.current)
    depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
    for dep in ("python3-yaml", "python3-uvloop", "python3-httptools", "python3-systemd",
                "python3-mypy-extensions"):
        assert dep in depends, depends
    files = run(["dpkg-deb", "-c", deb]).stdout
    for path in ("./usr/bin/hapymaster", "./etc/hapymaster/hapymaster.yaml",
                 "/systemd/system/hapymaster.service", "/systemd/system/hapymaster.socket",
                 "./usr/lib/sysusers.d/hapymaster.conf",
                 "./usr/share/man/man1/hapymaster.1.gz",
                 "./usr/share/man/man5/hapymaster.yaml.5.gz",
                 "./usr/share/doc/hapymaster/examples/notify-reload.conf",
                 "./usr/lib/python3/dist-packages/hapymaster/__init__.py"):
        assert path in files, path
    # No vendored dependency.
    for vendored in ("/yaml/", "/uvloop/", "/httptools/", "/systemd/journal"):
        assert vendored not in files.replace("/lib/systemd/system/", "/"), vendored
    # The hot path compiled by mypyc (setup.py) for the release's Python: each
    # module a shim next to its .py, and their one library (LIBRARY__mypyc),
    # no other compiled object, no generated C.
    py = PYTHON[deb_packages.suite].replace(".", "")
    shipped = re.findall(r"(?m)\./(\S+\.so(?:\.\d+)*)$", files)
    for name in [*COMPILED, COMPILED_LIBRARY + "__mypyc"]:
        built = (rf"usr/lib/python3/dist-packages/{name.replace('.', '/')}"
                 rf"\.cpython-{py}-\w+-linux-gnu\.so")
        assert [f for f in shipped if re.fullmatch(built, f)], (name, shipped)
    assert len(shipped) == len(COMPILED) + 1, shipped
    for name in COMPILED:
        assert f"./usr/lib/python3/dist-packages/{name.replace('.', '/')}.py" in files, name
    assert not re.search(r"(?m)\.[ch]$", files), "mypyc's generated C is shipped"
    arch = run(["dpkg-deb", "-f", deb, "Architecture"]).stdout.strip()
    assert arch == run(["dpkg", "--print-architecture"]).stdout.strip(), arch
    assert "libc6" in depends, depends      # ${shlibs:Depends}


def test_the_command_is_the_lean_launcher(deb_packages: DebPackages, tmp_path):
    """/usr/bin/hapymaster is packaging/bin/hapymaster, not the generated console
    script (which imports `re` first: ~9 ms at every `systemctl reload`)."""
    run(["dpkg-deb", "-x", str(deb_packages.current), str(tmp_path)])
    shipped = (tmp_path / "usr" / "bin" / "hapymaster").read_text().split("\n", 1)
    ours = (REPO / "packaging" / "bin" / "hapymaster").read_text().split("\n", 1)
    # dh_python3 may rewrite the interpreter line (trixie's writes "#! /usr/bin/python3").
    assert shipped[0].replace("#! ", "#!") == ours[0], shipped[0]
    assert shipped[1] == ours[1], shipped[1]
    assert (tmp_path / "usr" / "bin" / "hapymaster").stat().st_mode & 0o111


def test_package_is_built_with_the_suites_own_python(deb_packages: DebPackages):
    """Built in the release's chroot, not on the host: the build environment
    recorded in the .buildinfo has that release's python3."""
    info = deb_packages.buildinfo()
    python = re.search(r"\bpython3 \(= (\d+\.\d+)", info)
    assert python, info
    assert python.group(1) == PYTHON[deb_packages.suite], info
    assert "python3-all" in info and "debhelper" in info, info


def test_unit_exposure_at_most_1_5_offline():
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed on this host")
    proc = run(["systemd-analyze", "security", "--offline=yes", "--no-pager",
                str(REPO / "systemd" / "hapymaster.service")], check=False)
    last = proc.stdout.strip().splitlines()[-1]
    assert "Overall exposure level" in last, proc.stdout + proc.stderr
    level = float(last.split(":")[1].split()[0])
    print(f"offline exposure: {level}")
    assert level <= 1.5, proc.stdout


def test_debian_changelog_matches_the_project_version():
    """debian/changelog carries the upstream version: bump both together."""
    upstream = re.search(r'(?m)^version = "([^"]+)"', (REPO / "pyproject.toml").read_text())
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    packaged = re.match(r"hapymaster \(([^)-]+)-[^)]+\)", first)
    assert upstream and packaged, first
    assert packaged.group(1) == upstream.group(1), (first, upstream.group(1))
