#!/usr/bin/env bash
# The main job: trains a real model (an MLP on the wine-quality dataset, candle) whose metrics go
# through trainmetrics to TensorBoard (every step, ./runs) and to a local MLflow server
# (every 100 steps, loss averaged), then prints where to look and what was delivered.
# Extra arguments go to the trainer (see `cargo run --example train -- --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || { echo "demo.sh: cargo (Rust) is required" >&2; exit 1; }
scripts/setup.sh
PORT="${MLFLOW_PORT:-5000}"
uri="$(scripts/mlflow-server.sh start --port "$PORT" | tail -n 1)"
echo "demo.sh: MLflow UI at $uri (stop it with: scripts/mlflow-server.sh stop)"
cargo run --locked --example train -- --tracking-uri "$uri" "$@"
echo "demo.sh: TensorBoard: .venv/bin/tensorboard --logdir runs   MLflow: $uri"
