"""The tests run what ships: the hot-path modules compiled by mypyc, built
from the .py files as they are now (a stale build would test old code)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
COMPILED = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hapymaster"]["compiled"]


@pytest.mark.parametrize("name", COMPILED)
def test_hot_path_module_is_compiled_from_its_current_source(name: str) -> None:
    module = importlib.import_module(name)
    built = Path(module.__file__)
    assert built.suffix == ".so", \
        f"{name} runs from {built}, not compiled: rebuild with scripts/setup (pip install -e .)"
    source = built.parent / (name.rpartition(".")[2] + ".py")
    # An editable install builds next to the source: it must be newer than
    # the source it was built from (an installed package has no such pair
    # to compare, or both come from the same build).
    if source.exists():
        assert built.stat().st_mtime >= source.stat().st_mtime, \
            f"{built.name} is older than {source.name}: rebuild with scripts/setup"
