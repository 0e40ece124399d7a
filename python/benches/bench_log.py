"""Cost of `Run.log` per value against a bare OTel SDK `Gauge.set` with a step attribute, side
by side, in one process and against the same receiver (a `trainmetrics serve` this script starts:
the embedded default, TensorBoard into a temporary logdir).

    .venv/bin/python python/benches/bench_log.py [--steps 10000] [--metrics 4] [--repeats 5]

Two conditions, each measured `--repeats` times (the table shows the median, µs per value):
- `quiet`: no export runs while the loop records (bare SDK: a periodic reader with a 60 s
  interval; trainmetrics: export interval 60 s and `collect_every` 10 000, so a loop of at most
  10 000 steps has no collection either): the record call's own cost;
- `exporting`: exports run during the loop (bare SDK: a periodic reader every 100 ms; ours: an
  export interval of 100 ms).
Both providers use delta temporality and a cardinality limit above the steps of one loop, so no
point is lost; each loop records `steps` new steps × `metrics` gauges.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider, _Gauge  # noqa: E402
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: E402
from opentelemetry.sdk.metrics.view import View  # noqa: E402

import trainmetrics  # noqa: E402
from trainmetrics import _embedded  # noqa: E402
from trainmetrics._reader import DELTA_EVERYWHERE  # noqa: E402

NAMES = ["train.loss", "train.lr", "train.grad_norm", "train.throughput", "eval.loss", "eval.accuracy", "train.epoch", "train.tokens"]


def bare(endpoint: str, steps: int, metrics: int, interval_ms: int, first: int) -> float:
    exporter = OTLPMetricExporter(endpoint=endpoint, preferred_temporality=DELTA_EVERYWHERE)
    reader = PeriodicExportingMetricReader(exporter, export_interval_millis=interval_ms)
    provider = MeterProvider(metric_readers=[reader], views=[View(instrument_type=_Gauge, aggregation_cardinality_limit=steps * 2)], shutdown_on_exit=False)
    meter = provider.get_meter("bench")
    gauges = [meter.create_gauge(n) for n in NAMES[:metrics]]
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        attrs = {"step": step}
        for i, g in enumerate(gauges):
            g.set(1.0 / (step + i), attrs)
    elapsed = time.perf_counter() - t0
    provider.shutdown()
    return elapsed / (steps * metrics) * 1e6


def ours(endpoint: str, steps: int, metrics: int, interval_s: float, first: int) -> float:
    # Quiet: no collection inside the loop (collect_every at its maximum, half the cardinality
    # limit), as the bare SDK's reader makes none.
    collect_every = 10_000 if interval_s >= 60 else 2000
    run = trainmetrics.init(
        "bench", f"bench-{first}", endpoint=endpoint, export_interval=interval_s, collect_every=collect_every, print_summary=False
    )
    names = NAMES[:metrics]
    t0 = time.perf_counter()
    for step in range(first, first + steps):
        run.log({n: 1.0 / (step + i) for i, n in enumerate(names)}, step=step)
    elapsed = time.perf_counter() - t0
    summary = run.finish(timeout=60)
    assert summary.dropped == {} and summary.sent == steps * metrics, summary
    return elapsed / (steps * metrics) * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=9_000)
    p.add_argument("--metrics", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        os.environ.setdefault("TRAINMETRICS_STATE_DIR", os.path.join(d, "state"))
        os.environ.setdefault("TRAINMETRICS_SPOOL_DIR", os.path.join(d, "spool"))
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        serve = _embedded.acquire(os.path.join(d, "runs"), None)
        try:
            rows = []
            first = 1
            for label, bare_ms, ours_s in (("quiet", 60_000, 60.0), ("exporting", 100, 0.1)):
                b, o = [], []
                for _ in range(a.repeats):
                    b.append(bare(serve.http_endpoint, a.steps, a.metrics, bare_ms, first))
                    first += a.steps
                    o.append(ours(serve.http_endpoint, a.steps, a.metrics, ours_s, first))
                    first += a.steps
                rows.append((label, statistics.median(b), statistics.median(o)))
        finally:
            report = serve.release()
    print(f"{a.steps} steps x {a.metrics} gauges per loop, median of {a.repeats}; µs per value")
    print(f"{'condition':<12} {'SDK Gauge.set (step attr)':>26} {'trainmetrics Run.log':>22} {'ratio':>7}")
    for label, b, o in rows:
        print(f"{label:<12} {b:>26.2f} {o:>22.2f} {o / b:>7.2f}")
    if report:
        print(report)


if __name__ == "__main__":
    main()
