"""Axolotl with `TrainmetricsPlugin` from the YAML's `plugins:` list: a real `axolotl train` run
on CPU (tiny GPT-2, local tokenizer and dataset; see trainers/axolotl_tiny.py) through the
collector into `serve`, checked in TensorBoard (both loaders) and MLflow like the HF Trainer
tests, and in Axolotl's own record of the plugins it loaded; and the same run with the embedded
default (no endpoint anywhere)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import Collector, Mlflow, Serve, kv, read_tb_both, run_trainer
from test_transformers import assert_mlflow, assert_tb_equals, embedded_env, expected

PLUGIN = "trainmetrics.integrations.axolotl.TrainmetricsPlugin"


def result(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def test_axolotl_through_the_collector_into_serve(tmp_path: Path, mlflow: Mlflow, serve: Serve, collector: Collector) -> None:
    name = f"axo-col-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    proc = run_trainer(
        "axolotl_tiny.py", "--dir", str(tmp_path / "work"), "--out", str(out), "--run-name", name, "--experiment", "axolotl-collector",
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector.http}"}, timeout=600,
    )  # fmt: skip
    res = result(out)

    # Axolotl's plugin manager imported our class from the YAML (its own log lines, and its
    # registry at the end of training), and the trainer got exactly one of our callbacks from it.
    assert f"Attempting to load plugin: {PLUGIN}" in proc.stdout and f"Plugin loaded successfully: {PLUGIN}" in proc.stdout, proc.stdout[-3000:]
    assert PLUGIN in res["plugins"], res["plugins"]
    assert res["trainmetrics_callbacks"] == 1 and res["run_id"], res

    history = res["log_history"]
    assert max(e["step"] for e in history) == 200
    # Axolotl turns on `eval_on_start` with `eval_steps`: step 0, then every 50.
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 50, 100, 150, 200]

    collector.wait_drained()
    # The tiny model is GPT-2 with n_layer 2 at learning rate 0.001, logging every step, so the
    # HF Trainer checks apply as they are (params, FINISHED, train.loss mean per 100 steps).
    run = assert_mlflow(mlflow, "axolotl-collector", name, history, "FINISHED", 200)
    # The MLflow run is the one our callback started in Axolotl's process (serve keys it by the
    # trainmetrics run id).
    assert kv(run, "tags").get("trainmetrics.run_key") == res["run_id"], kv(run, "tags")
    params = kv(run, "params")
    # The Axolotl config's scalar keys, as the plugin adds them.
    assert params["axolotl.learning_rate"] == "0.001" and params["axolotl.sequence_len"] == "32", params
    assert params["axolotl.base_model"] == str(tmp_path / "work" / "model") and params["axolotl.micro_batch_size"] == "8", params
    # Its own keys are for the plugin, not params.
    assert not [k for k in params if k.startswith("axolotl.trainmetrics_")], params

    report = serve.stop()
    assert "dropped 0" in report, report
    tb = read_tb_both(serve.logdir)
    assert list(tb["scalars"]) == [name], tb["scalars"].keys()
    assert_tb_equals(tb["scalars"][name], expected(history))


def test_axolotl_with_the_embedded_default(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    name = f"axo-emb-{uuid.uuid4().hex[:6]}"
    out = tmp_path / "result.json"
    work = tmp_path / "work"
    proc = run_trainer(
        "axolotl_tiny.py", "--dir", str(work), "--out", str(out), "--run-name", name, "--experiment", "axolotl-embedded",
        env=embedded_env(tmp_path, mlflow), timeout=600,
    )  # fmt: skip
    res = result(out)
    assert PLUGIN in res["plugins"] and res["trainmetrics_callbacks"] == 1, res
    history = res["log_history"]
    run = assert_mlflow(mlflow, "axolotl-embedded", name, history, "FINISHED", 200)
    assert kv(run, "params")["axolotl.sequence_len"] == "32"
    # Axolotl runs in the work dir (axolotl_tiny.py), so the embedded serve's default logdir,
    # ./runs, is there; finish() said so, with what it delivered.
    assert f"tensorboard: {work / 'runs' / name}" in proc.stderr, proc.stderr[-2000:]
    assert "tensorboard: received" in proc.stderr and "dropped 0" in proc.stderr, proc.stderr[-2000:]
    tb = read_tb_both(work / "runs")
    assert_tb_equals(tb["scalars"][name], expected(history))
    # The embedded serve was stopped by the last (only) trainer.
    assert not list((tmp_path / "state").glob("*.json"))
