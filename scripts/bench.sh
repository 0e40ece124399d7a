#!/usr/bin/env bash
# Benchmarks, printed as one table: record-call cost and TensorBoard write rate against their
# peers (benches/throughput.rs, tests/support/bench_tb_writer.py, scripts/bench-peer-tbrs.sh),
# then the real trainer's step time (examples/train.rs, release build) with no MLflow, with
# MLflow reachable, and with MLflow unreachable (nothing listening): the trainer must not slow
# down when MLflow is down; then serve against the Collector built here, CPU per point on the
# same OTLP load (bench-ingest.sh).
#   scripts/bench.sh [--steps N]      (default 3000)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STEPS=3000
[ "${1:-}" = "--steps" ] && STEPS="$2"
scripts/setup.sh >/dev/null
tmp="$(mktemp -d)"
mdir="$tmp/mlflow"
cleanup() { scripts/mlflow-server.sh stop --dir "$mdir" >/dev/null 2>&1 || true; rm -rf "$tmp"; }
trap cleanup EXIT

free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

cargo build --release --locked --example train --bench throughput -q 2>/dev/null || cargo build --release --locked --example train -q
echo "| benchmark | value | unit | note |"
echo "|---|---|---|---|"
cargo bench --locked -q --bench throughput 2>/dev/null | grep '^|'
.venv/bin/python tests/support/bench_tb_writer.py
scripts/bench-peer-tbrs.sh

uri="$(scripts/mlflow-server.sh start --port "$(free_port)" --dir "$mdir" | tail -n 1)"
dead="http://127.0.0.1:$(free_port)"
train() { target/release/examples/train --steps "$STEPS" --logdir "$tmp/runs" --shutdown-timeout 5 "$@" 2>/dev/null; }
row() {
    local name="$1"; shift
    local out; out="$(train "$@")"
    local st; st="$(grep '^step_time_ms' <<<"$out" | sed 's/step_time_ms //')"
    local rc; rc="$(grep '^record_time_us' <<<"$out" | sed 's/record_time_us //')"
    local ml; ml="$(grep -E '^\s+mlflow:' <<<"$out" | sed 's/^ *//' || true)"
    echo "| trainer step, $name | ${st} | ms | record ${rc} us; ${ml:-no mlflow exporter} |"
}
row "no MLflow exporter" --no-mlflow
row "MLflow reachable" --tracking-uri "$uri"
row "MLflow unreachable" --tracking-uri "$dead"
# Memory: heap bytes per live series and per point in flight (benches/memory.rs, counted by
# its allocator), then serve's RSS for the same (scripts/bench-series.sh).
cargo bench --locked -q --bench memory 2>/dev/null | grep '^|'
cargo build --release --locked --bin trainmetrics --example otlp_load -q && scripts/bench-series.sh target/release/trainmetrics
# serve against the Collector built here on the same OTLP/HTTP load (scripts/bench-ingest.sh).
scripts/bench-ingest.sh
