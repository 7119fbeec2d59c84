"""Fixtures for the packaging and real-systemd tests (helpers.py has what they hand out).

``suite``         the Debian release (bookworm, trixie): every module that
                  uses the fixtures below runs once per suite.
``deb_packages``  the .deb built from this tree for that suite (and an
                  "upgrade" build of the same tree with a bumped version), by
                  packaging/build-deb --chroot in the suite's build chroot
                  (packaging/make-build-chroot: minbase + Build-Depends +
                  lintian), which is made once by debootstrap and cached as a
                  tarball in CACHE_DIR.
``rootfs_tar``    a minbase rootfs of that suite with systemd and hapymaster's
                  runtime dependencies, made once by debootstrap (~45 s) and
                  cached as a tarball outside the repository, so the container
                  needs no network at test time.
``container``     that rootfs booted under systemd-nspawn (private network:
                  loopback only), driven with ``nsenter``, shut down and
                  cleaned up afterwards. Everything it runs lives in a cgroup
                  made for it, so cleanup kills only what this test started.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import pytest

from .helpers import REPO, SYSTEM_PATH, UPGRADE_VERSION, Container, DebPackages, run

PR_SET_PDEATHSIG = 1
# Debian 12 (systemd 252, Python 3.11) and Debian 13 (systemd 257, Python 3.13).
SUITES = ("bookworm", "trixie")


def _host_mirror(sources: str = "/etc/apt/sources.list.d/debian.sources") -> str:
    """The Debian mirror this machine's apt uses (the one it is allowed to reach)."""
    try:
        with open(sources) as handle:
            for line in handle:
                if line.startswith("URIs:") and line.split()[1:]:
                    return line.split()[1]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


MIRROR = os.environ.get("HAPYMASTER_DEBIAN_MIRROR") or _host_mirror()
CACHE_DIR = Path(os.environ.get("HAPYMASTER_TEST_CACHE", "/var/cache/hapymaster-tests"))
# Pre-installed so that installing the .deb needs no network: systemd as PID 1,
# and hapymaster's runtime dependencies from the distribution.
ROOTFS_PACKAGES = ("systemd", "systemd-sysv", "dbus", "procps", "python3-minimal",
                   "python3-yaml", "python3-uvloop", "python3-httptools", "python3-systemd",
                   "python3-mypy-extensions")


def _why_no_nspawn() -> str | None:
    """Why this machine cannot boot a container at all, or None."""
    if os.geteuid() != 0:
        return "systemd-nspawn needs root"
    with open("/proc/mounts") as mounts:
        if not any(line.split()[2] == "cgroup2" for line in mounts):
            return "no cgroup2 hierarchy is mounted"
    return None


def _require_tools(*tools: str) -> None:
    """As root (scripts/test installs them), a missing tool is a set-up bug, not a skip."""
    missing = [t for t in tools if shutil.which(t, path=SYSTEM_PATH) is None]
    if missing and os.geteuid() != 0:
        pytest.skip(f"missing {', '.join(missing)} and not root to install them")
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: scripts/test installs the Debian packages "
                    "(debootstrap systemd-container dpkg-dev debhelper dh-python ...)")


# --- the packages ---------------------------------------------------------


def _copy_tree(dest: Path) -> None:
    """The files a commit of this tree would contain (tracked + new, not ignored)."""
    listing = run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others",
                   "--exclude-standard"], check=False)
    if listing.returncode == 0:
        names = [n for n in listing.stdout.split("\0") if n]
    else:  # not a git checkout: everything but the usual local clutter
        skip = {".git", ".venv", "__pycache__", ".pytest_cache"}
        names = [str(p.relative_to(REPO)) for p in REPO.rglob("*")
                 if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
                 and not any(part.endswith(".egg-info") for part in p.parts)]
    for name in names:
        src = REPO / name
        if not (src.exists() or src.is_symlink()):
            continue  # deleted in the work tree, not yet in the index
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            target.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, target)


def _bump_version(tree: Path, version: str) -> None:
    """Make ``tree`` a newer release: package version and the Python code's own."""
    pyproject = tree / "pyproject.toml"
    pyproject.write_text(re.sub(r'(?m)^version = "[^"]*"', f'version = "{version}"',
                                pyproject.read_text(), count=1))
    init = tree / "hapymaster" / "__init__.py"
    init.write_text(re.sub(r'(?m)^__version__ = "[^"]*"', f'__version__ = "{version}"',
                           init.read_text(), count=1))
    changelog = tree / "debian" / "changelog"
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    changelog.write_text(
        f"hapymaster ({version}-1) unstable; urgency=medium\n\n"
        "  * Upgrade built by tests/system to check reload-on-upgrade.\n\n"
        f" -- hapymaster maintainers <maintainers@users.noreply.r-seed-557ff343.example>  {stamp}\n\n"
        + changelog.read_text())


def _build(tree: Path, chroot: Path, out: Path) -> Path:
    run([str(tree / "packaging" / "build-deb"), "--chroot", str(chroot), str(out)], timeout=600)
    debs = sorted(out.glob("hapymaster_*.deb"))
    assert len(debs) == 1, debs
    return debs[0]


class PackageBuilds:
    """Per suite, once a session: the build chroot extracted from its cached
    tarball, and the .deb (current and upgrade) built in it by build-deb --chroot."""

    def __init__(self, base: Path):
        self.base = base
        self.built: dict[str, DebPackages] = {}

    def get(self, suite: str) -> DebPackages:
        if suite not in self.built:
            tarball = build_chroot_tarball(suite)
            t0 = time.monotonic()
            chroot = extract(tarball, self.base / f"{suite}-chroot")
            current = _build(REPO, chroot, self.base / f"{suite}-current")
            upgrade_tree = self.base / f"{suite}-upgrade-src"
            _copy_tree(upgrade_tree)
            _bump_version(upgrade_tree, UPGRADE_VERSION)
            upgrade = _build(upgrade_tree, chroot, self.base / f"{suite}-upgrade")
            shutil.rmtree(upgrade_tree)
            print(f"\n{suite}: chroot extracted and 2 packages built in "
                  f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
            self.built[suite] = DebPackages(suite, current, upgrade, chroot)
        return self.built[suite]


@pytest.fixture(scope="session")
def package_builds(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("building in a chroot needs root")
    _require_tools("debootstrap", "unshare", "chroot", "tar")
    builds = PackageBuilds(tmp_path_factory.mktemp("deb"))
    yield builds
    for debs in builds.built.values():  # ~0.5 GB each; the .debs stay for a look
        shutil.rmtree(debs.chroot, ignore_errors=True)


@pytest.fixture(scope="module", params=SUITES)
def suite(request) -> str:
    """The Debian release a module's tests run on: each module runs once per suite."""
    return request.param


@pytest.fixture(scope="module")
def deb_packages(suite: str, package_builds: PackageBuilds) -> DebPackages:
    return package_builds.get(suite)


# --- the root file systems ------------------------------------------------


def _cached_tarball(name: str, inputs: str, make: Callable[[Path], None]) -> Path:
    """A root file system made once by ``make(root)`` and kept as a tarball in
    CACHE_DIR, keyed by what went into it (``inputs``), so later runs need no network."""
    key = hashlib.sha256(inputs.encode()).hexdigest()[:12]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tarball = CACHE_DIR / f"{name}-{key}.tar"
    with open(CACHE_DIR / ".lock", "w") as lock:
        # Two test runs at once build each cache once.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if tarball.exists():
            return tarball
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
            root = Path(tmp) / "root"
            make(root)
            partial = Path(tmp) / "rootfs.tar"
            run(["tar", "--numeric-owner", "--xattrs", "-C", str(root), "-cf", str(partial), "."],
                timeout=300)
            partial.rename(tarball)  # atomic: a killed run leaves no half tarball
        print(f"\n{tarball.name}: made in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    return tarball


def extract(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    run(["tar", "--numeric-owner", "--xattrs", "-C", str(dest), "-xf", str(tarball)], timeout=300)
    return dest


def rootfs_tarball(suite: str) -> Path:
    """A minbase rootfs of ``suite`` with systemd and hapymaster's runtime dependencies."""
    def make(root: Path) -> None:
        run(["debootstrap", "--variant=minbase", f"--include={','.join(ROOTFS_PACKAGES)}",
             suite, str(root), MIRROR], timeout=900)
        # Nothing of apt's download cache is needed in the image.
        shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
        (root / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    return _cached_tarball(f"{suite}-rootfs", f"{suite} {MIRROR} {' '.join(ROOTFS_PACKAGES)}",
                           make)


def build_chroot_tarball(suite: str) -> Path:
    """The build chroot of ``suite`` (packaging/make-build-chroot), keyed by the
    Build-Depends it was made from."""
    script = REPO / "packaging" / "make-build-chroot"
    control = (REPO / "debian" / "control").read_text()
    build_deps = re.search(r"(?ms)^Build-Depends:(.*?)^\S", control)
    assert build_deps, "debian/control has no Build-Depends"
    inputs = f"{suite} {MIRROR} {build_deps.group(1)} {script.read_text()}"
    return _cached_tarball(f"{suite}-build", inputs,
                           lambda root: run([str(script), suite, str(root), MIRROR], timeout=900))


@pytest.fixture(scope="module")
def rootfs_tar(suite: str) -> Path:
    reason = _why_no_nspawn()
    if reason:
        print(f"\nSKIP nspawn system test: {reason}", file=sys.stderr)
        pytest.skip(reason)
    _require_tools("debootstrap", "systemd-nspawn", "nsenter", "tar")
    return rootfs_tarball(suite)


# --- the container --------------------------------------------------------


def _cgroup_roots() -> list[Path]:
    """The hierarchies a new cgroup must be made in for nspawn: the cgroup2 one,
    and the named systemd v1 hierarchy when the host runs in hybrid mode."""
    roots = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            _, mountpoint, fstype, options = line.split()[:4]
            if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options.split(",")):
                roots.append(Path(mountpoint))
    return roots


def _remove_cgroup_tree(path: Path) -> None:
    for _ in range(50):
        if not path.exists():
            return
        for dirpath, dirnames, _files in sorted(os.walk(path), key=lambda e: -len(e[0])):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
        if path.exists():
            time.sleep(0.1)


def _leader(nspawn: subprocess.Popen, deadline: float) -> int:
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            raise RuntimeError(f"systemd-nspawn exited {nspawn.returncode}")
        children = Path(f"/proc/{nspawn.pid}/task/{nspawn.pid}/children")
        for pid in children.read_text().split() if children.exists() else ():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                    return int(pid)
            except OSError:
                pass
        time.sleep(0.05)
    raise RuntimeError("the container's systemd did not start")


def _stop_container(c: Container) -> None:
    if c.nspawn.poll() is None:
        # SIGTERM to nspawn makes the container's systemd power off cleanly.
        c.nspawn.send_signal(signal.SIGTERM)
        try:
            c.nspawn.wait(timeout=20)
        except subprocess.TimeoutExpired:
            c.nspawn.kill()
            c.nspawn.wait(timeout=10)
    for cg in c.cgroups:
        kill = cg / "cgroup.kill"
        if kill.exists() and (cg / "cgroup.procs").exists():
            try:  # whatever is left in *our* cgroup: only what this test started
                kill.write_text("1")
            except OSError:
                pass
        _remove_cgroup_tree(cg)


@pytest.fixture(scope="module")
def container(suite: str, rootfs_tar: Path, deb_packages: DebPackages, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"nspawn-{suite}")
    t0 = time.monotonic()
    rootfs = extract(rootfs_tar, base / "rootfs")
    for deb, name in ((deb_packages.current, "hapymaster.deb"),
                      (deb_packages.upgrade, "hapymaster-upgrade.deb")):
        shutil.copy2(deb, rootfs / "root" / name)
    machine = f"hapytest-{suite}-{os.getpid()}"
    cmd = ["systemd-nspawn", "--quiet", "-D", str(rootfs), "--boot", f"--machine={machine}",
           "--register=no", "--private-network", "--link-journal=no", "--console=read-only",
           "--resolv-conf=off", "--timezone=off"]
    cgroups: list[Path] = []
    if Path("/proc/1/comm").read_text().strip() != "systemd":
        # No systemd on the host to give the container a scope unit: make a cgroup
        # of our own in each hierarchy and start nspawn inside it (--keep-unit:
        # nspawn then splits it into supervisor/ and payload/ itself).
        cmd.append("--keep-unit")
        for root in _cgroup_roots():
            cg = root / machine
            cg.mkdir(exist_ok=True)
            cgroups.append(cg)

    def enter_cgroups() -> None:
        for cg in cgroups:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
        # Should pytest itself be killed, nspawn gets SIGTERM and powers the
        # container off instead of leaving it running.
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    log = base / "nspawn.log"
    with open(log, "wb") as out:
        nspawn = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  preexec_fn=enter_cgroups, env={"PATH": SYSTEM_PATH})
    c = Container(rootfs, nspawn, 0, log, cgroups, suite)
    try:
        c.leader = _leader(nspawn, time.monotonic() + 30)
        deadline = time.monotonic() + 60
        while True:  # systemctl cannot connect until the container's systemd is up
            state = c.run(["systemctl", "is-system-running", "--wait"], timeout=60, check=False)
            if state.stdout.strip() or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        print(f"\ncontainer {machine}: rootfs ready and booted in {time.monotonic() - t0:.1f}s "
              f"(system {state.stdout.strip()})")
        if state.stdout.strip() not in ("running", "degraded"):
            failed = c.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise RuntimeError(f"container did not boot: {state.stdout.strip()} "
                               f"{state.stderr.strip()}\n{failed}")
        yield c
    except BaseException:
        print(c.log_tail(), file=sys.stderr)
        raise
    finally:
        _stop_container(c)
        shutil.rmtree(rootfs, ignore_errors=True)
