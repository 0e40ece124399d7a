#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs the Python side (./.venv: mlflow, tensorboard,
# the OTel Python SDK) when its pinned requirements changed, builds the OpenTelemetry Collector
# from Go modules once (.cache/otelcol; a cold build takes about 5 minutes), then runs every
# Rust test, then installs the Python package and runs its pytest suite (python/tests). Integration tests start their
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
status=0
cargo test --locked "$@" || status=$?
# The Python package (python/) into the venv, built as a user's `pip install ./python` builds it
# (maturin, the binary inside the wheel), with the dev profile and the venv's maturin so a rerun
# reuses ./target (seconds) instead of an optimized build (minutes); then its pytest suite.
PATH="$PWD/.venv/bin:$PATH" MATURIN_PEP517_ARGS="--profile dev" \
    .venv/bin/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall ./python
env -u TRAINMETRICS_BIN .venv/bin/python -m pytest python/tests -q || status=$?
exit "$status"
