#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the Python side (./.venv: mlflow, tensorboard,
# the OTel Python SDK) when its pinned requirements changed, builds the OpenTelemetry Collector
# from Go modules once (.cache/otelcol; a cold build takes about 5 minutes), then runs every
# Rust test. Integration tests start their
# own MLflow server on a free 127.0.0.1 port and read TensorBoard files with TensorBoard's own
# loaders; builds are cached in ./target, so reruns are fast.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
command -v cargo >/dev/null || { echo "test.sh: cargo (Rust) is required" >&2; exit 1; }
scripts/setup.sh
TRAINMETRICS_OTELCOL="$(scripts/build-collector.sh)"
export TRAINMETRICS_OTELCOL
# Spools of tests that end with MLflow unreachable stay inside the build folder, never in ~.
export TRAINMETRICS_SPOOL_DIR="$PWD/target/test-spool"
rm -rf "$TRAINMETRICS_SPOOL_DIR"
cargo test --locked "$@"
