"""The hot path compiled by mypyc, from the same .py files (issue 9).

Everything else about the package is in pyproject.toml; this file only adds
the extension modules, which setuptools cannot declare there. The modules
are listed once, in pyproject.toml's [tool.hapymaster] compiled, so that the
tests check the very list that is built.

mypyc, not Cython, by measurement (bench/README.md, "Compiling the hot
path"): on the same modules Cython's pure-Python mode ran more instructions
than CPython 3.11's own interpreter, mypyc fewer. mypyc compiles what mypy
checks: a compiled module must type-check, and its hints are enforced at
run time. The .py stays the one source: a checkout that was never built
runs it as it is. The source builds with the distros' mypy as well as
PyPI's (Debian 12 ships 1.0, Debian 13 1.15).
"""

import tomllib
from pathlib import Path

from mypyc.build import mypycify
from setuptools import setup

TOP = Path(__file__).resolve().parent
TOOL = tomllib.loads((TOP / "pyproject.toml").read_text())["tool"]["hapymaster"]
COMPILED = TOOL["compiled"]
SOURCES = [f"{name.replace('.', '/')}.py" for name in COMPILED]

setup(ext_modules=mypycify([
    # The modules they import are checked only as far as the compiled code
    # uses them (their own errors are not the build's), and the C libraries
    # without type information (httptools, uvloop, systemd) are Any.
    "--follow-imports=silent", "--ignore-missing-imports", *SOURCES,
    # One shared library for them all, named (hapymaster/worker/
    # hotpath__mypyc...so, not a hash-derived name at the top of
    # site-packages), each module a small shim next to its .py. One library
    # rather than one per module (separate=True): each would carry its own
    # copy of mypyc's runtime, 0.6 MiB more in every worker
    # (bench/worker_rss.py, issue 9).
], opt_level="3", separate=[(SOURCES, TOOL["compiled_library"])]))
