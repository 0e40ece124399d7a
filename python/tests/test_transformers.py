"""HF Trainer with `TrainmetricsCallback`: a real `Trainer` (tiny GPT-2 from a config, on
sklearn's digits, `logging_steps=1`, eval every 50) through the collector into `serve`, through
the embedded default, failing mid-training, and as two ranks under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Mlflow, Serve, f32, kv, read_tb_both, run_trainer

from trainmetrics.integrations.transformers import metric_name


def expected(log_history: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    """name → step → value, as the callback maps `log_history` (last value per step)."""
    out: dict[str, dict[int, float]] = {}
    for entry in log_history:
        step = int(entry["step"])
        for k, v in entry.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(metric_name(k), {})[step] = float(v)
    return out


def assert_tb_equals(tags: dict[str, list[list[Any]]], want: dict[str, dict[int, float]]) -> None:
    got = {tag: {int(p[0]): p[1] for p in pts} for tag, pts in tags.items()}
    assert sorted(got) == sorted(want), f"tags: got {sorted(got)}, want {sorted(want)}"
    for name, steps in want.items():
        for tag_pts in [tags[name]]:
            assert [int(p[0]) for p in tag_pts] == sorted(steps), f"{name}: steps {[p[0] for p in tag_pts][:10]}…"
        assert got[name] == {s: f32(v) for s, v in steps.items()}, f"{name}: values differ"


def assert_mlflow(mlflow: Mlflow, experiment: str, run_name: str, history: list[dict[str, Any]], status: str, last_step: int) -> dict[str, Any]:
    runs = [r for r in mlflow.wait_runs(experiment, 1, status) if r["info"]["run_name"] == run_name]
    assert len(runs) == 1, f"one MLflow run named {run_name}"
    run = runs[0]
    assert run["info"]["status"] == status
    params = kv(run, "params")
    assert params["learning_rate"] == "0.001" and params["model.n_layer"] == "2" and params["logging_steps"] == "1", params
    losses = expected(history)["train.loss"]
    windows = [(w, sum(v for s, v in losses.items() if w - 100 < s <= w) / len([s for s in losses if w - 100 < s <= w])) for w in range(100, last_step + 1, 100)]
    if last_step % 100:
        tail = [v for s, v in losses.items() if s > last_step - last_step % 100]
        windows.append((last_step, sum(tail) / len(tail)))
    got = mlflow.history(run["info"]["run_id"], "train.loss")
    assert [s for s, _ in got] == [w for w, _ in windows], f"train.loss windows {got}"
    for (s, v), (_, want) in zip(got, windows):
        assert v == pytest.approx(want, rel=1e-9), f"train.loss at {s}: {v} != mean {want}"
    return run


def result(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_hf_trainer_through_the_collector_into_serve(tmp_path: Path, mlflow: Mlflow, serve: Serve, collector: Collector) -> None:
    name = f"hf-col-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    run_trainer("hf_digits.py", "--out", str(out), "--run-name", name, "--experiment", "hf-collector", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.http}"})
    history = result(out)["log_history"]
    assert max(e["step"] for e in history) == 200 and sum("eval_loss" in e for e in history) == 4
    collector.wait_drained()
    assert_mlflow(mlflow, "hf-collector", name, history, "FINISHED", 200)
    report = serve.stop()
    assert "dropped 0" in report, report
    tb = read_tb_both(serve.logdir)
    assert list(tb["scalars"]) == [name], tb["scalars"].keys()
    assert_tb_equals(tb["scalars"][name], expected(history))


def embedded_env(tmp_path: Path, mlflow: Mlflow) -> dict[str, str]:
    env = {"MLFLOW_TRACKING_URI": mlflow.uri, "TRAINMETRICS_STATE_DIR": str(tmp_path / "state"), "TRAINMETRICS_SPOOL_DIR": str(tmp_path / "spool")}
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"):
        os.environ.pop(k, None)
    return env


def test_hf_trainer_with_the_embedded_default(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"hf-emb-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    proc = run_trainer("hf_digits.py", "--out", str(out), "--run-name", name, "--experiment", "hf-embedded", env=embedded_env(tmp_path, mlflow))
    history = result(out)["log_history"]
    run = assert_mlflow(mlflow, "hf-embedded", name, history, "FINISHED", 200)
    # finish() said where the run is and what was delivered (the embedded serve's report).
    assert f"tensorboard: {tmp_path / 'runs' / name}" in proc.stderr, proc.stderr[-2000:]
    assert f"/runs/{run['info']['run_id']}" in proc.stderr
    assert "tensorboard: received" in proc.stderr and "dropped 0" in proc.stderr, proc.stderr[-2000:]
    tb = read_tb_both(tmp_path / "runs")
    assert_tb_equals(tb["scalars"][name], expected(history))
    # The embedded serve was stopped by the last (only) trainer.
    assert not list((tmp_path / "state").glob("*.json"))


def test_hf_run_that_raises_ends_failed(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"hf-fail-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    proc = run_trainer("hf_digits.py", "--out", str(out), "--run-name", name, "--experiment", "hf-failed", "--fail-at", "120", env=embedded_env(tmp_path, mlflow), expect_ok=False)
    assert proc.returncode != 0 and "injected failure at step 120" in proc.stderr
    history = result(out)["log_history"]
    # The failure is raised at the end of step 120, before HF logs that step.
    assert max(e["step"] for e in history) == 119
    assert_mlflow(mlflow, "hf-failed", name, history, "FAILED", 119)
    tb = read_tb_both(tmp_path / "runs")
    assert_tb_equals(tb["scalars"][name], expected(history))


def test_hf_two_ranks_under_torchrun(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "missing component: torchrun (torch in this venv)"
    monkeypatch.chdir(tmp_path)
    name = f"hf-ddp-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    env = embedded_env(tmp_path, mlflow)
    env["OMP_NUM_THREADS"] = "1"
    run_trainer(
        "hf_digits.py", "--out", str(out), "--run-name", name, "--experiment", "hf-ddp", "--all-ranks", "--steps", "100",
        env=env, launcher=[torchrun, "--standalone", "--nproc_per_node", "2"],
    )  # fmt: skip
    ranks = [result(Path(f"{out}.rank{r}")) for r in (0, 1)]
    assert ranks[0]["run_id"] == ranks[1]["run_id"], "both ranks share one run id"
    runs = mlflow.wait_runs("hf-ddp", 1, "FINISHED")
    assert [r["info"]["run_name"] for r in runs] == [name], "one MLflow run for the job"
    tb = read_tb_both(tmp_path / "runs")
    assert sorted(tb["scalars"]) == [f"{name}/rank-0", f"{name}/rank-1"]
    for r in (0, 1):
        assert_tb_equals(tb["scalars"][f"{name}/rank-{r}"], expected(ranks[r]["log_history"]))
    # MLflow has rank 0's values (the default job view), its train.loss the mean of each window.
    got = mlflow.history(runs[0]["info"]["run_id"], "train.loss")
    losses = expected(ranks[0]["log_history"])["train.loss"]
    assert [s for s, _ in got] == [100]
    assert got[0][1] == pytest.approx(sum(losses.values()) / len(losses), rel=1e-9)
