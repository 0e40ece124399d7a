#!/usr/bin/env bash
# Peer row for scripts/bench.sh: builds (quietly) and runs benches/peers/tensorboard-rs, the
# tensorboard-rs crate writing the same scalars as the TensorBoardExporter row. Its own package
# and target dir (.cache/peer-target), so its dependencies stay out of the main build. If the
# build or the run fails, it prints a row saying so instead of no row.
#   scripts/bench-peer-tbrs.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
name="peer: tensorboard-rs SummaryWriter::add_scalar (Rust)"
pkg=benches/peers/tensorboard-rs
export CARGO_TARGET_DIR="$PWD/.cache/peer-target"
if ! nice -n 10 cargo build --release --locked -q --manifest-path "$pkg/Cargo.toml" >/dev/null 2>&1; then
    echo "| $name | n/a | points/s | not measured: could not build $pkg (tensorboard-rs =0.5.9; try cargo build --release --locked there) |"
    exit 0
fi
if ! out="$("$CARGO_TARGET_DIR/release/bench-peer-tensorboard-rs" 2>/dev/null)" || ! grep -q '^|' <<<"$out"; then
    echo "| $name | n/a | points/s | not measured: $pkg built but its run failed |"
    exit 0
fi
grep '^|' <<<"$out"
