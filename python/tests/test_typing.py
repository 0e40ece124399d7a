"""The package is typed (`py.typed`): mypy --strict over it, with the venv's own packages."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_the_package_passes_mypy_strict() -> None:
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT / "python", capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"mypy found problems:\n{out.stdout[-5000:]}{out.stderr[-2000:]}"
    assert (ROOT / "python/src/trainmetrics/py.typed").is_file()
