"""The core API (`trainmetrics.init`, `Run.log`, `Run.histogram`, `Run.finish`) against the real
`serve` (embedded and behind the collector), MLflow and both TensorBoard loaders."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import TRAINERS, Collector, Mlflow, Serve, binary, f32, free_port, kv, read_tb, read_tb_both

import trainmetrics
from trainmetrics import _embedded


@pytest.fixture
def embedded(tmp_path: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The embedded default in this process: no OTel endpoint, MLflow from MLFLOW_TRACKING_URI,
    state and logdir in tmp_path."""
    for k in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "TRAINMETRICS_RUN_ID", "MLFLOW_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.uri)
    monkeypatch.setenv("TRAINMETRICS_BIN", str(binary()))
    monkeypatch.setenv("TRAINMETRICS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("TRAINMETRICS_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "runs"
    # No embedded serve outlives its test.
    for state in (tmp_path / "state").glob("*.json"):
        pid = json.loads(state.read_text())["pid"]
        if _embedded.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"an embedded serve (pid {pid}) was left running")


def test_plain_loop_with_the_embedded_default(embedded: Path, mlflow: Mlflow) -> None:
    """Every value at its step in both loaders (float32, NaN/±Inf kept, a name the OTel API
    refuses), histograms, MLflow windows (train.loss mean, others last), params, FINISHED."""
    name = f"plain-{uuid.uuid4().hex[:6]}"
    special = {3: math.nan, 4: math.inf, 5: -math.inf}
    want: dict[str, dict[int, float]] = {"train.loss": {}, "acc@1": {}, "eval/top-5 (%)": {}}
    with trainmetrics.init("core", name, params={"lr": 3e-3, "optim": {"name": "adamw", "betas": [0.9, 0.95]}}) as run:
        for s in range(1, 251):
            loss = special.get(s, 1.0 / s)
            run.log({"train.loss": loss, "acc@1": s / 250}, step=s)
            want["train.loss"][s], want["acc@1"][s] = loss, s / 250
            if s % 50 == 0:
                run.log({"eval/top-5 (%)": 100.0 - s / 10}, step=s)
                want["eval/top-5 (%)"][s] = 100.0 - s / 10
                run.histogram("train.grad", [((i * s) % 97) / 97 - 0.5 for i in range(1000)], step=s)
    summary = run.finish()  # idempotent: the `with` block already finished it
    assert summary.status == "FINISHED" and summary.dropped == {} and summary.recorded == 250 * 2 + 5 * 2
    assert summary.sent == summary.recorded, summary
    assert summary.tensorboard_dir == embedded / name
    assert summary.mlflow_url is not None and summary.mlflow_url.startswith(mlflow.uri + "/#/experiments/")
    assert summary.serve_report is not None and "tensorboard: received 510 delivered 510 dropped 0" in summary.serve_report

    tb = read_tb_both(embedded)
    tags = tb["scalars"][name]
    assert sorted(tags) == sorted(want)
    for tag, steps in want.items():
        got = [(p[0], p[1]) for p in tags[tag]]
        exp = [(s, "NaN" if isinstance(v, float) and math.isnan(v) else "Infinity" if v == math.inf else "-Infinity" if v == -math.inf else f32(v)) for s, v in sorted(steps.items())]
        assert got == exp, tag
    hist = tb["histograms"][name]["train.grad"]
    assert [h[0] for h in hist] == [50, 100, 150, 200, 250]
    assert all(sum(b[2] for b in h[1]) == 1000 for h in hist), "every value in its histogram"

    runs = [r for r in mlflow.wait_runs("core", 1, "FINISHED") if r["info"]["run_name"] == name]
    assert len(runs) == 1
    rid = runs[0]["info"]["run_id"]
    params = kv(runs[0], "params")
    assert params["lr"] == "0.003" and params["optim.name"] == "adamw" and params["optim.betas"] == "[0.9, 0.95]"
    loss = mlflow.history(rid, "train.loss")
    assert [s for s, _ in loss] == [100, 200, 250]
    # The window 1..100 holds NaN and ±Inf: its mean is NaN (MLflow stores it as such).
    assert math.isnan(loss[0][1])
    assert loss[1][1] == pytest.approx(sum(1.0 / s for s in range(101, 201)) / 100, rel=1e-12)
    assert loss[2][1] == pytest.approx(sum(1.0 / s for s in range(201, 251)) / 50, rel=1e-12)
    tags_ = kv(runs[0], "tags")
    acc_key = next(k.split("/", 1)[1] for k, v in tags_.items() if k.startswith("trainmetrics.name/") and v == "acc@1")
    assert mlflow.history(rid, acc_key) == [(100, 0.4), (200, 0.8), (250, 1.0)]


def test_bad_input_is_counted_and_loses_nothing_else(embedded: Path) -> None:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    run = trainmetrics.init("core", name)
    run.log({"ok": 1.0, "": 5.0, " / ": 6.0, "text": "abc", "none": None, "obj": object()}, step=1)
    run.log({"ok": 2.0}, step=-1)
    run.log({"ok": 3.0}, step=1.5)  # type: ignore[arg-type]
    run.log({"ok": 4.0}, step=2**63)
    run.log({"ok": 5.0}, step=2)
    run.histogram("h", [1.0, math.nan, "x", 2.0], step=2)
    summary = run.finish()
    run.log({"ok": 9.0}, step=3)
    assert summary.dropped == {"invalid_name": 2, "invalid_value": 4, "invalid_step": 3, "nonfinite_histogram_value": 1}, summary.dropped
    assert run.finish().dropped == summary.dropped  # the same summary; the late log is not in it
    tb = read_tb(embedded, "python")
    assert [(p[0], p[1]) for p in tb["scalars"][name]["ok"]] == [(1, 1.0), (2, 5.0)]
    assert sum(b[2] for b in tb["histograms"][name]["h"][0][1]) == 2
    with pytest.raises(trainmetrics.ConfigError):
        trainmetrics.init("core", "x", export_interval=0)
    with pytest.raises(trainmetrics.ConfigError):
        trainmetrics.init("core", "x", endpoint="localhost:4318")


def test_a_down_endpoint_never_blocks_and_every_point_is_counted(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    run = trainmetrics.init("core", "down", endpoint=f"http://127.0.0.1:{port}", timeout=2.0, print_summary=False)
    started = time.monotonic()
    for s in range(1, 501):
        run.log({"train.loss": 1.0 / s, "train.lr": 0.1}, step=s)
    logging_s = time.monotonic() - started
    summary = run.finish()
    # Not a timing assertion of speed: 1000 records take far under a second, and a blocked
    # record would wait out the exporter's 10 s timeout at least once.
    assert logging_s < 5, f"log() waited for the network ({logging_s:.1f}s)"
    assert summary.sent == 0 and summary.dropped == {"shutdown_timeout": 1000}, summary
    assert summary.finish_seconds < 2.0 + 5, summary.finish_seconds


def test_two_trainers_share_one_embedded_serve(embedded: Path, mlflow: Mlflow) -> None:
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "TRAINMETRICS_STATE_DIR", "TRAINMETRICS_SPOOL_DIR", "TRAINMETRICS_BIN")}
    names = [f"share-{i}-{uuid.uuid4().hex[:4]}" for i in (0, 1)]
    procs = []
    for i, name in enumerate(names):
        procs.append(subprocess.Popen(
            [sys.executable, str(TRAINERS / "plain_loop.py"), "--out", str(embedded.parent / f"r{i}.json"), "--run-name", name,
             "--experiment", "share", "--steps", "150", "--sleep-ms", str(20 if i == 0 else 5)],
            env={**os.environ, **env}, cwd=embedded.parent, stderr=subprocess.PIPE, text=True,
        ))  # fmt: skip
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    log = next((embedded.parent / "state").glob("*.log")).read_text()
    assert sum(line.startswith("listening grpc=") for line in log.splitlines()) == 1, "one serve for both trainers:\n" + log[-3000:]
    # The trainer that ended last stopped it and printed its report.
    assert sum("tensorboard: received 600 delivered 600 dropped 0" in e for e in errs) == 1, errs
    tb = read_tb_both(embedded)
    for i, name in enumerate(names):
        rec = json.loads((embedded.parent / f"r{i}.json").read_text())["recorded"]
        for tag in ("train.loss", "train.lr"):
            assert [(p[0], p[1]) for p in tb["scalars"][name][tag]] == [(int(s), f32(v)) for s, v in rec[tag].items()]
    runs = mlflow.wait_runs("share", 2, "FINISHED")
    assert sorted(r["info"]["run_name"] for r in runs) == sorted(names)


def test_sigterm_ends_the_run_killed(embedded: Path, mlflow: Mlflow) -> None:
    name = f"term-{uuid.uuid4().hex[:6]}"
    ready = embedded.parent / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(TRAINERS / "plain_loop.py"), "--out", str(embedded.parent / "r.json"), "--run-name", name,
         "--experiment", "term", "--steps", "100000", "--sleep-ms", "10", "--ready", str(ready)],
        env=dict(os.environ), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer did not start"
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    # SIGTERM ends the process by unwinding (exit status 128 + 15), so the run can end KILLED.
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, err[-2000:])
    assert f"run {name}" in err and "KILLED" in err, err[-2000:]
    runs = [r for r in mlflow.wait_runs("term", 1, "KILLED") if r["info"]["run_name"] == name]
    assert len(runs) == 1
    rec = json.loads((embedded.parent / "r.json").read_text())["recorded"]["train.loss"]
    tb = read_tb(embedded, "python")["scalars"][name]["train.loss"]
    # Every step recorded before the signal is in TensorBoard (the last one may be the step the
    # signal interrupted, recorded but not yet in the trainer's own file).
    got = [p[0] for p in tb]
    assert got[: len(rec)] == [int(s) for s in rec] and len(got) - len(rec) in (0, 1)


def test_mlflow_run_id_continues_that_run(embedded: Path, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"cont-{uuid.uuid4().hex[:6]}"
    first = trainmetrics.init("cont", name, print_summary=False)
    for s in range(1, 101):
        first.log({"train.loss": 1.0}, step=s)
    first.finish()
    runs = mlflow.wait_runs("cont", 1, "FINISHED")
    monkeypatch.setenv("MLFLOW_RUN_ID", runs[0]["info"]["run_id"])
    second = trainmetrics.init("cont", name, print_summary=False)
    assert second.run_id == first.run_id
    for s in range(101, 201):
        second.log({"train.loss": 3.0}, step=s)
    second.finish()
    runs = mlflow.wait_runs("cont", 1, "FINISHED")
    assert len(runs) == 1
    assert mlflow.history(runs[0]["info"]["run_id"], "train.loss") == [(100, 1.0), (200, 3.0)]


def test_through_the_collector_with_grpc(serve: Serve, collector: Collector, mlflow: Mlflow, monkeypatch: pytest.MonkeyPatch) -> None:
    """OTLP/gRPC (OTEL_EXPORTER_OTLP_PROTOCOL=grpc) to the collector, which forwards to serve."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    name = f"grpc-{uuid.uuid4().hex[:6]}"
    run = trainmetrics.init("grpc", name, endpoint=f"http://{collector.grpc}", print_summary=False)
    for s in range(1, 201):
        run.log({"train.loss": float(s)}, step=s)
    summary = run.finish()
    assert summary.sent == 200 and summary.dropped == {}
    collector.wait_drained()
    runs = mlflow.wait_runs("grpc", 1, "FINISHED")
    assert mlflow.history(runs[0]["info"]["run_id"], "train.loss") == [(100, 50.5), (200, 150.5)]
    assert "tensorboard: received 200 delivered 200 dropped 0" in serve.stop()
    assert [p[0] for p in read_tb(serve.logdir, "rust")["scalars"][name]["train.loss"]] == list(range(1, 201))


HAMMER = """
import sys, trainmetrics
run = trainmetrics.init("term", sys.argv[1])
open(sys.argv[2], "w").close()
s = 0
while True:
    s += 1
    run.log({"a": 1.0 / s, "b": float(s), "c@1": 0.5, "d e": 2.0}, step=s)
"""


def test_sigterm_in_the_middle_of_log_ends_the_run_killed_without_deadlock(embedded: Path, mlflow: Mlflow) -> None:
    """SIGTERM lands wherever the trainer is, inside the SDK's locks too: it must still end."""
    for i, delay in enumerate((0.3, 0.71, 1.37)):
        ready = embedded.parent / f"ready{i}"
        name = f"hammer-{i}-{uuid.uuid4().hex[:4]}"
        proc = subprocess.Popen([sys.executable, "-c", HAMMER, name, str(ready)], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(delay)
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"try {i}: the trainer hung after SIGTERM")
        assert proc.returncode == 143 and "KILLED" in err and "dropped 0" in err, (i, proc.returncode, err[-1500:])


FORKER = """
import multiprocessing as mp, sys, trainmetrics
def work(x):
    return x * x
run = trainmetrics.init("fork", sys.argv[1])
for s in range(1, 51):
    run.log({"loss": 1.0 / s}, step=s)
pool = mp.get_context("fork").Pool(2)
assert pool.map(work, range(10))[3] == 9
pool.terminate()
pool.join()
for s in range(51, 151):
    run.log({"loss": 1.0 / s}, step=s)
summary = run.finish()
assert summary.status == "FINISHED" and summary.sent == 150 and summary.dropped == {}, summary
"""


def test_a_forked_child_neither_ends_the_run_nor_stops_the_serve(embedded: Path) -> None:
    name = f"fork-{uuid.uuid4().hex[:6]}"
    out = subprocess.run([sys.executable, "-c", FORKER, name], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stderr.count("FINISHED") == 1 and "KILLED" not in out.stderr, out.stderr[-3000:]
    assert "tensorboard: received 150 delivered 150 dropped 0" in out.stderr
    assert [p[0] for p in read_tb(embedded, "rust")["scalars"][name]["loss"]] == list(range(1, 151))


def test_many_names_the_otel_api_refuses_never_overflow(embedded: Path) -> None:
    """They share one SDK gauge (with the name as an attribute), so 25 of them at each of 1000
    steps are 25 000 sets of one stream: past the SDK's limit unless collected in time."""
    run = trainmetrics.init("names", f"refused-{uuid.uuid4().hex[:6]}", print_summary=False)
    for s in range(1, 1001):
        run.log({f"acc@{j}": j + 1.0 / s for j in range(25)}, step=s)
    summary = run.finish()
    assert summary.dropped == {} and summary.sent == summary.recorded == 25_000, summary
    assert summary.serve_report and "tensorboard: received 25000 delivered 25000 dropped 0" in summary.serve_report


def test_finish_is_safe_to_misuse_and_counts_what_came_after(embedded: Path) -> None:
    run = trainmetrics.init("finish", f"finish-{uuid.uuid4().hex[:6]}", print_summary=False)
    for bad in (0, -1, math.inf, math.nan, "5", True):
        with pytest.raises(trainmetrics.ConfigError):
            run.finish(timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(trainmetrics.ConfigError):
        run.finish(None)  # type: ignore[arg-type]
    stop = False
    logged = [0]

    def logger() -> None:
        s = 0
        while not stop:
            s += 1
            run.log({"x": float(s)}, step=s)
            logged[0] += 1

    t = __import__("threading").Thread(target=logger)
    t.start()
    time.sleep(0.5)
    summary = run.finish()
    stop = True
    t.join()
    later = run.finish()
    # Every value the thread logged is either sent or counted after_finish: none lost silently.
    assert later.sent == later.recorded and later.sent + later.dropped.get("after_finish", 0) == logged[0], (later, logged)
    assert summary.status == later.status == "FINISHED"


def test_odd_values_and_histograms_are_counted_not_raised(embedded: Path) -> None:
    import torch
    name = f"odd-{uuid.uuid4().hex[:6]}"
    run = trainmetrics.init("odd", name, print_summary=False)
    run.log({"big": 10**400, "ok": 1.0, "t": torch.tensor(2.5)}, step=1)
    run.log({"ok": 2.0}, step=True)  # type: ignore[arg-type]
    run.log(None, step=2)  # type: ignore[arg-type]
    run.histogram("bf16", torch.arange(-8, 8, dtype=torch.bfloat16) / 4, step=1)
    run.histogram("scalar", 1.0, step=1)  # type: ignore[arg-type]  # a scalar is one value
    run.histogram("none", None, step=1)  # type: ignore[arg-type]
    run.histogram("wide", [1e308, -1e308, 0.0], step=1)
    run.histogram("big", torch.randn(2_000_000), step=1)
    summary = run.finish()
    assert summary.dropped == {"invalid_value": 3, "invalid_step": 1}, summary.dropped  # big, None, None
    assert summary.serve_report and "dropped 0" in summary.serve_report, summary.serve_report
    tb = read_tb(embedded, "python")
    assert [(p[0], p[1]) for p in tb["scalars"][name]["ok"]] == [(1, 1.0)]
    assert tb["scalars"][name]["t"][0][1] == 2.5
    hists = tb["histograms"][name]
    assert sum(b[2] for b in hists["bf16"][0][1]) == 16 and sum(b[2] for b in hists["wide"][0][1]) == 3
    assert sum(b[2] for b in hists["scalar"][0][1]) == 1
    assert sum(b[2] for b in hists["big"][0][1]) == 2_000_000


def test_an_embedded_serve_outlives_no_trainer(embedded: Path) -> None:
    """A trainer killed with SIGKILL leaves its lease: the watchdog stops serve by itself."""
    ready = embedded.parent / "ready"
    proc = subprocess.Popen(
        [sys.executable, str(TRAINERS / "plain_loop.py"), "--out", str(embedded.parent / "r.json"), "--steps", "100000",
         "--sleep-ms", "10", "--ready", str(ready)],
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    state = next((embedded.parent / "state").glob("*.json"))
    pid = json.loads(state.read_text())["pid"]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 45
    # The watchdog removes the state file just after serve has exited.
    while _embedded.pid_alive(pid) or state.exists():
        assert time.monotonic() < deadline, f"serve {pid} still runs (or is still registered) 45 s after its only trainer was killed"
        time.sleep(0.5)
    log = next((embedded.parent / "state").glob("*.log")).read_text()
    assert "tensorboard: received" in log, log[-2000:]
