"""`pip install ./python` in a fresh venv, as a user does it (build isolation: pip fetches
maturin; maturin compiles the Rust binary into the wheel): `import trainmetrics` works and the
wheel's own `trainmetrics serve` takes a run (the embedded default, no TRAINMETRICS_BIN)."""

from __future__ import annotations

import os
import subprocess
import venv
from pathlib import Path

from conftest import ROOT, f32, read_tb


def test_pip_install_in_a_fresh_venv_gives_import_and_a_working_serve(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRAINMETRICS_", "OTEL_", "MLFLOW_", "PYTHON", "VIRTUAL_ENV"))}
    # The test suite's build profile (scripts/test.sh): the same maturin build as a user's,
    # without a second optimized compile of the whole binary.
    env["MATURIN_PEP517_ARGS"] = os.environ.get("MATURIN_PEP517_ARGS", "--profile dev")
    env["PATH"] = os.pathsep.join([str(env_dir / "bin"), env.get("PATH", "")])
    out = subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT / "python")], env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, f"pip install ./python failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    binary = env_dir / "bin" / "trainmetrics"
    assert binary.is_file(), "the wheel did not install the trainmetrics binary"
    version = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith("trainmetrics "), version

    script = (
        "import trainmetrics\n"
        "run = trainmetrics.init('install', 'fresh')\n"
        "for s in range(1, 11):\n"
        "    run.log({'train.loss': 1.0 / s}, step=s)\n"
        "summary = run.finish()\n"
        "assert str(trainmetrics.find_binary()).startswith(%r), trainmetrics.find_binary()\n"
        "assert summary.sent == 10 and summary.dropped == {}, summary\n"
    ) % str(env_dir)
    env["TRAINMETRICS_STATE_DIR"] = str(tmp_path / "state")
    env["TRAINMETRICS_SPOOL_DIR"] = str(tmp_path / "spool")
    run = subprocess.run([str(py), "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-4000:]}"
    assert "tensorboard: received 10 delivered 10 dropped 0" in run.stderr, run.stderr
    tb = read_tb(tmp_path / "runs", "rust")
    assert [(p[0], p[1]) for p in tb["scalars"]["fresh"]["train.loss"]] == [(s, f32(1.0 / s)) for s in range(1, 11)]
