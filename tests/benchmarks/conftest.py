"""The benchmark scripts are not a package: their tests load each one as a module by its path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmark_script(monkeypatch):
    """``benchmark_script("speed.py")``: benchmarks/speed.py as a fresh module. With ``name=`` it
    is registered in sys.modules while it runs (for scripts whose dataclasses look their module up
    there) and removed after the test."""
    def load(relpath: str, name: str | None = None):
        spec = importlib.util.spec_from_file_location(name or Path(relpath).stem,
                                                      BENCHMARKS / relpath)
        mod = importlib.util.module_from_spec(spec)
        if name:
            monkeypatch.setitem(sys.modules, name, mod)
        spec.loader.exec_module(mod)
        return mod
    return load
