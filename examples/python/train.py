"""A real Python trainer whose metrics go out through the `trainmetrics` package (python/): one
OTLP stream to a collector, which hands it to `trainmetrics serve` for TensorBoard and MLflow.

Run it (the venv comes from scripts/setup.sh; a collector or `trainmetrics serve` listens on 4317):

    .venv/bin/python examples/python/train.py --endpoint http://127.0.0.1:4317
    .venv/bin/python examples/python/train.py --steps 3000 --run-name digits-1 --record-csv rec.csv

What it trains: a 64 -> hidden -> 10 MLP (ReLU, softmax cross-entropy) on scikit-learn's bundled
digits (1797 8x8 images, shipped inside the package, no download), written in numpy: an 80/20
split and standardization with the train split's statistics, mini-batches without replacement
per epoch, AdamW with decoupled weight decay, and a learning rate with linear warmup then cosine
decay. One seed (`--seed`) fixes the split, the shuffles and the initial weights.

What it records, with the same names as examples/train.rs: every step `train.loss`, `train.lr`,
`train.grad_norm`, `train.throughput` (samples/s of the step's training, recording excluded);
every `--eval-every` steps and at the last step `eval.loss`, `eval.accuracy` on the held-out
split. Everything about how they travel (the step attribute, non-finite values, names the OTel
API refuses, delta temporality, the cardinality bound, collection off the trainer's thread, the
run identity in the resource, the run-end gauge) is the package's: `trainmetrics.init` and
`Run.log`, see python/src/trainmetrics/_run.py. `--endpoint` is OTLP/gRPC (`--protocol` picks
http/protobuf); `--flush-every` is the package's `collect_every`.

`--record-csv FILE` writes every value recorded as `step,name,value` with a header, the value as
Python's `repr(float)` (shortest round-trip form, so `float(value)` is exactly what was sent;
non-finite values read `nan`, `inf`, `-inf`). `--sleep-ms` pauses after each step (to watch a
run live; not counted in the step time). The hidden `--console` flag swaps the OTLP exporter for
the SDK's ConsoleMetricExporter, one JSON document per export on stderr, for debugging.

At the end it prints the final numbers, what was sent (a run whose points were not all sent, or
whose training failed, exits 1), `step_time_ms mean=... p50=... p99=...` (training plus
recording of each step, without the periodic evaluation and sleeps) and the run id.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import IO

# Single-threaded BLAS, set before numpy loads OpenBLAS: the matrices here are tiny (64 x 64), so
# BLAS threads only add wake-ups and fight the exporter thread for the cores (on 2 busy cores the
# eval forward pass took ~10 ms with 2 threads, ~0.3 ms with 1). An explicit setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402 - after the BLAS setting above
from sklearn.datasets import load_digits  # noqa: E402

try:
    import trainmetrics
except ImportError:  # run from the checkout without `pip install ./python`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "python" / "src"))
    import trainmetrics

DATASET = "sklearn-digits"
FEATURES = 64
CLASSES = 10
EVAL_FRACTION = 0.2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train an MLP on sklearn's digits with numpy; metrics via the trainmetrics package over OTLP.",
    )
    d = " (default: %(default)s)"
    p.add_argument("--endpoint", default="http://127.0.0.1:4317", help="OTLP endpoint (the collector)" + d)
    p.add_argument("--protocol", default="grpc", choices=["grpc", "http/protobuf"], help="OTLP protocol" + d)
    p.add_argument("--export-interval-ms", type=int, default=1000, metavar="MS", help="collection interval" + d)
    p.add_argument("--experiment", default="trainmetrics-demo", help="ml.experiment.name" + d)
    p.add_argument("--run-name", help="ml.run.name (default: py-<UTC date>-<time>)")
    p.add_argument("--run-id", help="ml.run.id; the same id continues the same run (default: a new uuid4 hex)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps" + d)
    p.add_argument("--eval-every", type=int, default=50, metavar="N", help="evaluate every N steps and at the last" + d)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate" + d)
    p.add_argument("--batch-size", type=int, default=64, help="samples per mini-batch" + d)
    p.add_argument("--hidden", type=int, default=64, help="width of the hidden layer" + d)
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps before the cosine decay" + d)
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decoupled weight decay" + d)
    p.add_argument("--seed", type=int, default=42, help="seed of the split, the shuffles and the initial weights" + d)
    p.add_argument("--record-csv", metavar="FILE", help="write every recorded value to FILE as step,name,value")
    p.add_argument("--sleep-ms", type=int, default=0, metavar="MS", help="sleep after each step" + d)
    p.add_argument("--flush-every", type=int, default=5000, metavar="N", help="collect every N new steps (at most 10000)" + d)
    # Debugging: print every export as JSON on stderr instead of sending it.
    p.add_argument("--console", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.steps < 1:
        p.error("--steps must be at least 1")
    if args.eval_every < 1:
        p.error("--eval-every must be at least 1")
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    if args.hidden < 1:
        p.error("--hidden must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must not be negative")
    if not (math.isfinite(args.lr) and args.lr > 0):
        p.error("--lr must be a positive number")
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        p.error("--weight-decay must be a non-negative number")
    if args.export_interval_ms < 1:
        p.error("--export-interval-ms must be at least 1")
    if args.sleep_ms < 0:
        p.error("--sleep-ms must not be negative")
    if not 1 <= args.flush_every <= 10_000:
        p.error("--flush-every must be between 1 and 10000")
    if args.steps >= 2**63:
        p.error("--steps is too large")
    if args.run_name is None:
        args.run_name = "py-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    if args.run_id is None:
        args.run_id = uuid.uuid4().hex
    return args


# ---------------------------------------------------------------------------------------------
# Data and model


class Data:
    """Standardized features (float64) and int labels of both splits."""

    def __init__(self, x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray):
        self.x_train, self.y_train, self.x_eval, self.y_eval = x_train, y_train, x_eval, y_eval


def load_data(rng: np.random.Generator) -> Data:
    """Loads digits, splits 80/20 with `rng`, and standardizes with the train split's statistics
    (fitting on all rows would leak the held-out split into training)."""
    ds = load_digits()
    x = np.asarray(ds.data, dtype=np.float64)
    y = np.asarray(ds.target, dtype=np.int64)
    if x.shape[1] != FEATURES:
        raise ValueError(f"{DATASET}: expected {FEATURES} features, got {x.shape[1]}")
    if y.min() < 0 or y.max() >= CLASSES:
        raise ValueError(f"{DATASET}: labels outside 0..{CLASSES - 1}")
    order = rng.permutation(len(x))
    n_eval = int(round(len(x) * EVAL_FRACTION))
    eval_idx, train_idx = order[:n_eval], order[n_eval:]
    mean = x[train_idx].mean(axis=0)
    std = x[train_idx].std(axis=0)
    # Border pixels are always 0 in the train split: no signal, and dividing by 1 keeps them at 0
    # instead of NaN.
    std[std < 1e-12] = 1.0
    xs = (x - mean) / std
    return Data(xs[train_idx], y[train_idx], xs[eval_idx], y[eval_idx])


class Mlp:
    """64 -> hidden -> 10 with ReLU; parameters in a list so the optimizer treats them alike."""

    def __init__(self, hidden: int, rng: np.random.Generator):
        # PyTorch's default Linear init, U(+-1/sqrt(fan_in)) for weights and biases, as the Rust
        # example does, drawn from the seeded generator.
        def linear(fan_in: int, fan_out: int) -> tuple[np.ndarray, np.ndarray]:
            bound = 1.0 / math.sqrt(fan_in)
            return rng.uniform(-bound, bound, (fan_in, fan_out)), rng.uniform(-bound, bound, fan_out)

        w1, b1 = linear(FEATURES, hidden)
        w2, b2 = linear(hidden, CLASSES)
        self.params = [w1, b1, w2, b2]

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w1, b1, w2, b2 = self.params
        h = np.maximum(x @ w1 + b1, 0.0)
        return h @ w2 + b2, h

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[np.ndarray]]:
        """Mean softmax cross-entropy of the batch and its gradients (same order as params)."""
        w1, _, w2, _ = self.params
        logits, h = self.forward(x)
        log_p = log_softmax(logits)
        n = len(x)
        loss = -float(log_p[np.arange(n), y].mean())
        d_logits = np.exp(log_p)
        d_logits[np.arange(n), y] -= 1.0
        d_logits /= n
        d_h = d_logits @ w2.T
        d_h[h <= 0.0] = 0.0
        return loss, [x.T @ d_h, d_h.sum(axis=0), h.T @ d_logits, d_logits.sum(axis=0)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    # Shifted by the row max so exp never overflows.
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def loss_and_accuracy(model: Mlp, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    logits, _ = model.forward(x)
    loss = -float(log_softmax(logits)[np.arange(len(x)), y].mean())
    return loss, float((logits.argmax(axis=1) == y).mean())


class AdamW:
    """Adam with decoupled weight decay (p *= 1 - lr * wd before the Adam update, as candle's and
    PyTorch's AdamW do), betas (0.9, 0.999), eps 1e-8."""

    def __init__(self, params: list[np.ndarray], weight_decay: float):
        self.params = params
        self.wd = weight_decay
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads: list[np.ndarray], lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.t += 1
        c1 = 1.0 - beta1**self.t
        c2 = 1.0 - beta2**self.t
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            p *= 1.0 - lr * self.wd
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + eps)


def learning_rate(step: int, peak: float, warmup: int, total: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay towards 0 at `total`; steps
    are 1-based and the decay starts one step late, so no step runs at lr = 0 (as in train.rs)."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup - 1) / max(total - warmup, 1)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------
# Metrics


class Recorder:
    """Everything the trainer records goes through here, so the CSV is exactly what was sent."""

    def __init__(self, run: trainmetrics.Run, csv_file: IO[str] | None):
        self.run = run
        self.csv = csv.writer(csv_file, lineterminator="\n") if csv_file is not None else None
        if self.csv is not None:
            self.csv.writerow(["step", "name", "value"])

    def record_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)
        if self.csv is not None:
            for name, value in values.items():
                self.csv.writerow([step, name, repr(float(value))])


# ---------------------------------------------------------------------------------------------
# Training


def stats(values: list[float], precision: int) -> str:
    """`mean=... p50=... p99=...` (nearest-rank percentiles)."""
    if not values:
        return "mean=nan p50=nan p99=nan"
    v = sorted(values)

    def rank(q: float) -> float:
        return v[min(max(math.ceil(q * len(v)), 1), len(v)) - 1]

    return f"mean={sum(v) / len(v):.{precision}f} p50={rank(0.5):.{precision}f} p99={rank(0.99):.{precision}f}"


class Summary:
    def __init__(self) -> None:
        self.last_train_loss = math.nan
        self.first_eval: tuple[int, float, float] | None = None
        self.last_eval: tuple[int, float, float] | None = None
        self.full_train = (math.nan, math.nan)
        self.step_ms: list[float] = []
        self.record_us: list[float] = []
        self.eval_ms: list[float] = []
        self.wall_s = 0.0


def train(args: argparse.Namespace, data: Data, model: Mlp, rec: Recorder, s: Summary) -> None:
    opt = AdamW(model.params, args.weight_decay)
    # A stream of its own, so changing the model size does not change the batches.
    rng = np.random.default_rng([args.seed, 1])
    n_train = len(data.x_train)
    take = min(args.batch_size, n_train)
    order = np.arange(n_train)
    cursor = n_train
    started = time.perf_counter()

    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        # Epoch-wise sampling without replacement; a partial tail batch is skipped so every step
        # sees the same batch size and the loss curve is comparable across steps.
        if cursor + take > n_train:
            rng.shuffle(order)
            cursor = 0
        idx = order[cursor : cursor + take]
        cursor += take
        lr = learning_rate(step, args.lr, args.warmup, args.steps)
        loss, grads = model.loss_and_grads(data.x_train[idx], data.y_train[idx])
        grad_norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads))
        opt.step(grads, lr)
        train_s = time.perf_counter() - t0

        t_rec = time.perf_counter()
        rec.record_step(
            step, {"train.loss": loss, "train.lr": lr, "train.grad_norm": grad_norm, "train.throughput": take / max(train_s, 1e-9)}
        )
        record_s = time.perf_counter() - t_rec
        s.last_train_loss = loss

        if step % args.eval_every == 0 or step == args.steps:
            t_eval = time.perf_counter()
            eval_loss, eval_acc = loss_and_accuracy(model, data.x_eval, data.y_eval)
            s.eval_ms.append((time.perf_counter() - t_eval) * 1e3)
            t_rec = time.perf_counter()
            rec.record_step(step, {"eval.loss": eval_loss, "eval.accuracy": eval_acc})
            record_s += time.perf_counter() - t_rec
            if s.first_eval is None:
                s.first_eval = (step, eval_loss, eval_acc)
            s.last_eval = (step, eval_loss, eval_acc)
            print(
                f"step {step:>5}/{args.steps}  lr {lr:.2e}  train.loss {loss:.4f}  "
                f"eval.loss {eval_loss:.4f}  eval.accuracy {eval_acc:.4f}",
                flush=True,
            )
        s.step_ms.append((train_s + record_s) * 1e3)
        s.record_us.append(record_s * 1e6)

        if args.sleep_ms > 0:
            time.sleep(args.sleep_ms / 1e3)

    s.wall_s = time.perf_counter() - started
    s.full_train = loss_and_accuracy(model, data.x_train, data.y_train)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    # Everything that can fail on bad input happens before the run exists, so a typo does not
    # leave an empty run behind.
    rng = np.random.default_rng(args.seed)
    data = load_data(rng)
    model = Mlp(args.hidden, rng)
    csv_file = open(args.record_csv, "w", newline="", encoding="utf-8") if args.record_csv else None

    params = {
        "lr": args.lr, "batch_size": args.batch_size, "hidden": args.hidden, "steps": args.steps,
        "warmup": args.warmup, "weight_decay": args.weight_decay, "seed": args.seed, "dataset": DATASET,
        "eval_every": args.eval_every, "model": f"mlp-{FEATURES}-{args.hidden}-{CLASSES}",
        "optimizer": "adamw", "schedule": "linear-warmup-cosine",
    }  # fmt: skip
    exporter = None
    if args.console:
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        from trainmetrics._reader import DELTA_EVERYWHERE

        exporter = ConsoleMetricExporter(
            out=sys.stderr, formatter=lambda d: d.to_json(indent=None) + "\n", preferred_temporality=DELTA_EVERYWHERE
        )
    run = trainmetrics.init(
        args.experiment,
        args.run_name,
        run_id=args.run_id,
        params=params,
        tags={"service.name": "trainmetrics-python-example"},
        endpoint=None if args.console else args.endpoint,
        protocol=args.protocol,
        export_interval=args.export_interval_ms / 1e3,
        collect_every=args.flush_every,
        exporter=exporter,
        print_summary=False,
    )
    print(f"run: {args.run_name} (id {args.run_id}, experiment {args.experiment})")
    print(f"export: {run.endpoint}, every {args.export_interval_ms} ms, delta")
    print(
        f"data: {DATASET}, {len(data.x_train)} train / {len(data.x_eval)} eval samples; "
        f"model mlp-{FEATURES}-{args.hidden}-{CLASSES}; {args.steps} steps",
        flush=True,
    )

    s = Summary()
    failure: BaseException | None = None
    try:
        train(args, data, model, Recorder(run, csv_file), s)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - reported, then exit 1
        failure = e
    finally:
        if csv_file is not None:
            csv_file.close()
    # The run-end gauge, then what was recorded goes out, also when training failed.
    t_flush = time.perf_counter()
    summary = run.finish("FINISHED" if failure is None else "FAILED")
    final_flush_ms = (time.perf_counter() - t_flush) * 1e3

    if failure is None:
        print()
        print(f"final train.loss (last batch) {s.last_train_loss:.4f}")
        print(f"final train split: loss {s.full_train[0]:.4f} accuracy {s.full_train[1]:.4f}")
        if s.first_eval and s.last_eval:
            f, l = s.first_eval, s.last_eval
            print(f"eval.loss     {f[1]:.4f} (step {f[0]}) -> {l[1]:.4f} (step {l[0]})")
            print(f"eval.accuracy {f[2]:.4f} (step {f[0]}) -> {l[2]:.4f} (step {l[0]})")
        print(f"train_time_s {s.wall_s:.2f} ({args.steps} steps)")
        print(f"step_time_ms {stats(s.step_ms, 3)}")
        print(f"record_time_us {stats(s.record_us, 1)}")
        print(f"eval_time_ms {stats(s.eval_ms, 3)} ({len(s.eval_ms)} evaluations, not in step_time_ms)")
    print(f"final_flush_ms {final_flush_ms:.1f}")
    dropped = ", ".join(f"{k} {v}" for k, v in sorted(summary.dropped.items())) or "0"
    print(f"exported: {summary.sent} of {summary.recorded} points; dropped: {dropped}")
    print(f"run id: {args.run_id}")

    status = 0
    if failure is not None:
        traceback.print_exception(failure, file=sys.stderr)
        print(f"error: training failed: {failure!r}", file=sys.stderr)
        status = 1
    if summary.dropped or summary.sent != summary.recorded:
        print(f"error: {summary.recorded - summary.sent} point(s) were not sent to {run.endpoint} ({dropped})", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
