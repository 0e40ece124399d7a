"""Lightning with `TrainmetricsLogger`: a real `Trainer` through the collector into `serve`, and
one that raises mid-training (embedded default)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Mlflow, Serve, f32, kv, read_tb_both, run_trainer
from test_transformers import embedded_env


def expected(logged: list[list[Any]]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for step, metrics in logged:
        for k, v in metrics.items():
            out.setdefault(k, {})[int(step)] = float(v)
    return out


def check(tb_tags: dict[str, list[list[Any]]], mlflow: Mlflow, run: dict[str, Any], want: dict[str, dict[int, float]], last: int) -> None:
    got = {tag: {int(p[0]): p[1] for p in pts} for tag, pts in tb_tags.items()}
    assert sorted(got) == sorted(want)
    for name, steps in want.items():
        assert got[name] == {s: f32(v) for s, v in steps.items()}, name
    params = kv(run, "params")
    assert params["lr"] == "0.003" and params["hidden"] == "64", params
    losses = want["train_loss"]
    hist = mlflow.history(run["info"]["run_id"], "train_loss")
    windows = sorted({((s + 99) // 100) * 100 if ((s + 99) // 100) * 100 <= last else last for s in losses})
    assert [s for s, _ in hist] == windows, hist
    for w, v in hist:
        # collector-config/trainmetrics.yaml averages train.loss only; train_loss is `last`.
        in_window = [s for s in losses if w - 100 < s <= w]
        assert v == pytest.approx(losses[max(in_window)], rel=1e-9)


def test_lightning_through_the_collector_into_serve(tmp_path: Path, mlflow: Mlflow, serve: Serve, collector: Collector) -> None:
    name = f"pl-col-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    run_trainer("lightning_digits.py", "--out", str(out), "--run-name", name, "--experiment", "pl-collector", env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.http}"})
    logged = json.loads(out.read_text())["logged"]
    want = expected(logged)
    assert {"train_loss", "val_loss", "val_acc", "epoch"} <= set(want), sorted(want)
    last = max(max(s) for s in want.values())
    collector.wait_drained()
    runs = [r for r in mlflow.wait_runs("pl-collector", 1, "FINISHED") if r["info"]["run_name"] == name]
    assert len(runs) == 1
    assert "dropped 0" in serve.stop()
    tb = read_tb_both(serve.logdir)
    check(tb["scalars"][name], mlflow, runs[0], want, last)


def test_lightning_run_that_raises_ends_failed(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"pl-fail-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    proc = run_trainer("lightning_digits.py", "--out", str(out), "--run-name", name, "--experiment", "pl-failed", "--fail-at", "120", env=embedded_env(tmp_path, mlflow), expect_ok=False)
    assert proc.returncode != 0 and "injected failure at step 120" in proc.stderr, proc.stderr[-3000:]
    want = expected(json.loads(out.read_text())["logged"])
    runs = [r for r in mlflow.wait_runs("pl-failed", 1, "FAILED") if r["info"]["run_name"] == name]
    assert len(runs) == 1
    tb = read_tb_both(tmp_path / "runs")
    got = {tag: {int(p[0]): p[1] for p in pts} for tag, pts in tb["scalars"][name].items()}
    assert got == {k: {s: f32(v) for s, v in steps.items()} for k, steps in want.items()}
