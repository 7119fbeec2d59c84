"""What the worker template imports (every worker carries it: issue 9's idle RSS),
and the small stand-ins that keep modules out of it."""

from __future__ import annotations

import html
import subprocess
import sys
from pathlib import Path

from hapymaster import pdeathsig
from hapymaster.worker.stats import _escape

ROOT = Path(__file__).resolve().parents[2]


def python_output(script: str) -> str:
    """What ``script`` prints in a fresh interpreter (a clean sys.modules)."""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_template_imports_neither_html_nor_ctypes():
    # What forkserver.serve imports before it forks workers.
    script = ("import sys\n"
              "import hapymaster.forkserver\n"
              "from hapymaster.worker import __main__\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('html', 'ctypes')))\n")
    assert python_output(script).strip() == "[]"


def test_escape_is_html_escape():
    for text in ("", "plain", "<b>&amp;</b>", "a\"b'c", "&&<<>>\"\"''", "é ü \u2603 <x y='1'>"):
        assert _escape(text) == html.escape(text)


def test_libc_function_calls_prctl_and_keeps_errno():
    prctl = pdeathsig.libc_function("prctl")
    assert prctl(-1, 0, 0, 0, 0) == -1          # no such option
    import _ctypes
    assert _ctypes.get_errno() == 22             # EINVAL, saved as ctypes' use_errno does
    assert pdeathsig.libc_function("mallopt")(-3, 4 << 20) == 1   # M_MMAP_THRESHOLD


def test_libc_function_unknown_name():
    try:
        pdeathsig.libc_function("no_such_function_in_libc")
    except AttributeError:
        return
    raise AssertionError("an unknown function must raise AttributeError, as ctypes does")


def test_set_process_name_and_pdeathsig():
    script = ("import _ctypes, os, signal\n"
              "from hapymaster import pdeathsig\n"
              "pdeathsig.set_process_name(b'hapy-test-name-too-long')\n"
              "print(open('/proc/self/comm').read().strip())\n"
              "pdeathsig.die_with_parent(os.getppid(), signal.SIGTERM)\n"
              "armed = pdeathsig._CInt()\n"
              "pdeathsig.libc_function('prctl')(2, _ctypes.byref(armed), 0, 0, 0)  # GET_PDEATHSIG\n"
              "print(armed.value == signal.SIGTERM)\n")
    assert python_output(script).split() == ["hapy-test-name-", "True"]
