"""Real components for the Python tests: an MLflow server, `trainmetrics serve`, the
OpenTelemetry Collector built here, and TensorBoard's own loaders (both), each started on free
127.0.0.1 ports and stopped by PID at the end. A missing component fails the test naming it.

Components come from the environment `scripts/test.sh` sets up:
- the `trainmetrics` package installed in this venv with its binary (`scripts/test.sh` runs
  `pip install ./python`), or `TRAINMETRICS_BIN` for another binary;
- `TRAINMETRICS_OTELCOL`: the collector (`scripts/build-collector.sh`);
- this interpreter's venv: mlflow, tensorboard, torch, transformers, lightning, axolotl.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINERS = Path(__file__).resolve().parent / "trainers"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def binary() -> Path:
    """The binary the package uses: `TRAINMETRICS_BIN`, else the installed wheel's."""
    import trainmetrics

    try:
        return trainmetrics.find_binary()
    except trainmetrics.EmbeddedServeError as e:
        raise AssertionError(f"missing component: the trainmetrics binary ({e}); scripts/test.sh installs ./python into .venv") from e


def otelcol() -> Path:
    env = os.environ.get("TRAINMETRICS_OTELCOL")
    assert env, "missing component: the OpenTelemetry Collector; run scripts/build-collector.sh and set TRAINMETRICS_OTELCOL (scripts/test.sh does both)"
    p = Path(env)
    assert p.is_file(), f"missing component: the OpenTelemetry Collector at {p}"
    return p


def stop_pid(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# -- MLflow ---------------------------------------------------------------------------------------


@dataclass
class Mlflow:
    uri: str

    def api(self, path: str, body: dict[str, Any] | None = None) -> Any:
        url = f"{self.uri}/api/2.0/mlflow/{path}"
        if body is None:
            with urllib.request.urlopen(url, timeout=30) as r:
                return json.load(r)
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def runs(self, experiment: str) -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"experiment_name": experiment})
        try:
            exp = self.api(f"experiments/get-by-name?{q}")["experiment"]["experiment_id"]
        except urllib.error.HTTPError:
            return []
        return list(self.api("runs/search", {"experiment_ids": [exp], "max_results": 1000}).get("runs", []))

    def wait_runs(self, experiment: str, n: int, status: str | None = None, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            runs = self.runs(experiment)
            if len(runs) >= n and (status is None or all(r["info"]["status"] == status for r in runs)):
                return runs
            if time.monotonic() > deadline:
                got = [(r["info"]["run_name"], r["info"]["status"]) for r in runs]
                raise AssertionError(f"experiment {experiment}: wanted {n} runs {status or ''}, got {got}")
            time.sleep(0.5)

    def history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        q = urllib.parse.urlencode({"run_id": run_id, "metric_key": key, "max_results": 25000})
        ms = self.api(f"metrics/get-history?{q}").get("metrics", [])
        return sorted((int(m["step"]), float(m["value"])) for m in ms)


def kv(run: dict[str, Any], what: str) -> dict[str, str]:
    return {x["key"]: x["value"] for x in run["data"].get(what, [])}


@pytest.fixture(scope="session")
def mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mlflow]:
    port = free_port()
    data = tmp_path_factory.mktemp("mlflow")
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests/support/mlflow_server.py"), "--port", str(port), "--dir", str(data), "--parent-pid", str(os.getpid())],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.startswith("READY "):
        stop_pid(proc)
        raise AssertionError(f"missing component: the MLflow server did not start: {line}")
    try:
        yield Mlflow(line.split(" ", 1)[1])
    finally:
        stop_pid(proc)


# -- trainmetrics serve ---------------------------------------------------------------------------


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    grpc: str
    http: str
    telemetry: str
    logdir: Path

    def stop(self) -> str:
        """SIGTERM, then its shutdown report (stdout)."""
        stop_pid(self.proc)
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://{self.telemetry}/metrics", timeout=10) as r:
            return str(r.read().decode())


def start_serve(logdir: Path, mlflow_uri: str | None, spool: Path, extra: list[str] | None = None) -> Serve:
    """`serve` from collector-config/trainmetrics.yaml (TensorBoard every step, MLflow every 100
    with train.loss averaged), on free ports."""
    cmd = [
        str(binary()), "serve", "--config", str(ROOT / "collector-config/trainmetrics.yaml"),
        "--set", "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0",
        "--set", "receivers.otlp.protocols.http.endpoint=127.0.0.1:0",
        "--set", "service.telemetry.endpoint=127.0.0.1:0",
        "--set", f"exporters.tensorboard.logdir={logdir}",
        "--set", "exporters.tensorboard.reorder_window=1s",
        "--set", "exporters.tensorboard.linger=200ms",
    ]  # fmt: skip
    if mlflow_uri:
        cmd += ["--set", f"exporters.mlflow.tracking_uri={mlflow_uri}"]
    else:
        # The file's MLflow exporter has nowhere to go.
        cmd += ["--set", "exporters.mlflow.tracking_uri=http://127.0.0.1:9"]
    for e in extra or []:
        cmd += ["--set", e]
    env = dict(os.environ, TRAINMETRICS_SPOOL_DIR=str(spool))
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"grpc=(\S+) http=(\S+) telemetry=(\S+)", line)
    if not m:
        stop_pid(proc)
        raise AssertionError(f"trainmetrics serve did not start: {line!r}")
    return Serve(proc, m[1], m[2], m[3], logdir)


@pytest.fixture
def serve(tmp_path: Path, mlflow: Mlflow) -> Iterator[Serve]:
    s = start_serve(tmp_path / "runs", mlflow.uri, tmp_path / "spool")
    try:
        yield s
    finally:
        stop_pid(s.proc)


# -- the collector --------------------------------------------------------------------------------


@dataclass
class Collector:
    proc: subprocess.Popen[bytes]
    grpc: str
    http: str
    metrics_url: str

    def _total(self, metric: str) -> float:
        """The sum of one of the collector's own counters (0 until its endpoint answers)."""
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric + "{"))

    def sent(self) -> float:
        return self._total("otelcol_exporter_sent_metric_points")

    def accepted(self) -> float:
        return self._total("otelcol_receiver_accepted_metric_points")

    def wait_drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            a, s = self.accepted(), self.sent()
            if a > 0 and s >= a:
                return
            assert time.monotonic() < deadline, f"the collector sent {s} of the {a} data points it accepted in {timeout} s"
            time.sleep(0.2)


@pytest.fixture
def collector(serve: Serve, tmp_path: Path) -> Iterator[Collector]:
    grpc, http, mport = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}", free_port()
    env = dict(
        os.environ,
        OTELCOL_GRPC_ENDPOINT=grpc,
        OTELCOL_HTTP_ENDPOINT=http,
        TRAINMETRICS_GRPC_ENDPOINT=serve.grpc,
        OTELCOL_QUEUE_DIR=str(tmp_path / "queue"),
        OTELCOL_METRICS_LEVEL="basic",
        OTELCOL_METRICS_PORT=str(mport),
        OTELCOL_LOG_LEVEL="warn",
    )
    proc = subprocess.Popen([str(otelcol()), f"--config={ROOT / 'collector-config/agent.yaml'}"], env=env, stdout=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(grpc.rsplit(":", 1)[1])), timeout=1).close()
            socket.create_connection(("127.0.0.1", int(http.rsplit(":", 1)[1])), timeout=1).close()
            break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None, "the collector did not listen"
            time.sleep(0.1)
    try:
        yield Collector(proc, grpc, http, f"http://127.0.0.1:{mport}/metrics")
    finally:
        stop_pid(proc)


# -- TensorBoard's loaders ------------------------------------------------------------------------


def read_tb(logdir: Path, loader: str) -> dict[str, Any]:
    """What TensorBoard's own `loader` ("python" or "rust") shows of `logdir` (see
    tests/support/read_tb.py)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "tests/support/read_tb.py"), "--logdir", str(logdir), "--loader", loader],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, f"read_tb.py --loader {loader} failed:\n{out.stderr[-3000:]}"
    return dict(json.loads(out.stdout))


def read_tb_both(logdir: Path) -> dict[str, Any]:
    """Both loaders; asserts they show the same scalars and returns the Python loader's view."""
    py, rs = read_tb(logdir, "python"), read_tb(logdir, "rust")
    strip = lambda tb: {run: {tag: [(p[0], p[1]) for p in pts] for tag, pts in tags.items()} for run, tags in tb["scalars"].items()}  # noqa: E731
    assert strip(py) == strip(rs), "TensorBoard's Python and Rust loaders disagree"
    return py


def f32(x: float) -> float:
    """`x` as TensorBoard stores a scalar (float32)."""
    import struct

    return float(struct.unpack("f", struct.pack("f", x))[0])


# -- trainers in their own processes --------------------------------------------------------------


def run_trainer(script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 900, expect_ok: bool = True, launcher: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `python/tests/trainers/<script>` with this interpreter (or under `launcher`, e.g.
    torchrun), with the installed package."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    binary()  # fail here, naming the component, rather than in the trainer
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_OFFLINE", "1")
    full_env.setdefault("HF_DATASETS_OFFLINE", "1")
    full_env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = (launcher or [sys.executable]) + [str(TRAINERS / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    if expect_ok:
        assert out.returncode == 0, f"{script} exited {out.returncode}:\n--- stdout\n{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out
