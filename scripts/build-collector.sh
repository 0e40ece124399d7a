#!/usr/bin/env bash
# Build the OpenTelemetry Collector distribution `otelcol-trainmetrics` from
# collector-config/builder-config.yaml with the OpenTelemetry Collector Builder
# (ocb), from Go modules only (Go module proxy; no binary downloads).
#
# Usage: scripts/build-collector.sh [--force]      (callable from any cwd)
#
#   BIN="$(scripts/build-collector.sh)"   # progress goes to stderr; the last
#                                         # (and only) stdout line is the binary
#
# Everything stays inside the repository (all ignored by git):
#   .cache/go/            GOPATH, GOMODCACHE (.cache/go/pkg/mod), GOCACHE (.cache/go/build)
#   .cache/otelcol/bin/   ocb ("builder"), `go install`ed at the manifest's core version
#   .cache/otelcol/build/ generated sources and the binary otelcol-trainmetrics
#   .cache/otelcol/stamp  sha256 of (manifest + `go version` + ocb version)
# A rerun with an unchanged stamp and an existing binary builds nothing.
set -euo pipefail

BIN_NAME="otelcol-trainmetrics"   # must match dist.name in the manifest

log() { printf 'build-collector: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument: $arg (usage: $0 [--force])" ;;
  esac
done

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MANIFEST="$REPO_ROOT/collector-config/builder-config.yaml"
CACHE="$REPO_ROOT/.cache"
OTELCOL_DIR="$CACHE/otelcol"
BUILD_DIR="$OTELCOL_DIR/build"          # must match dist.output_path in the manifest
BIN_PATH="$BUILD_DIR/$BIN_NAME"
STAMP_FILE="$OTELCOL_DIR/stamp"
OCB="$OTELCOL_DIR/bin/builder"

command -v go >/dev/null 2>&1 || die "'go' was not found on PATH. Install Go >= 1.26 (the collector modules' go.mod says 'go 1.26.0') and rerun."
[ -f "$MANIFEST" ] || die "manifest not found: $MANIFEST"
command -v sha256sum >/dev/null 2>&1 || die "'sha256sum' (coreutils) is required"
grep -Eq '^[[:space:]]*output_path:[[:space:]]*\.cache/otelcol/build[[:space:]]*$' "$MANIFEST" \
  || die "dist.output_path in $MANIFEST must be .cache/otelcol/build (this script looks for the binary there)"

# ocb is installed at the core release the manifest names (its telemetry module,
# go.opentelemetry.io/collector/service), so the two cannot drift apart.
OCB_VERSION="$(sed -n 's#^[[:space:]]*gomod:[[:space:]]*go\.opentelemetry\.io/collector/service[[:space:]]\{1,\}\(v[0-9][0-9.]*\).*#\1#p' "$MANIFEST" | head -n1)"
[ -n "$OCB_VERSION" ] || die "cannot find the core version (telemetry gomod go.opentelemetry.io/collector/service vX.Y.Z) in $MANIFEST"

# Go state lives in the repo so CI reruns are fast and nothing is written outside it.
export GOPATH="$CACHE/go"
export GOMODCACHE="$CACHE/go/pkg/mod"
export GOCACHE="$CACHE/go/build"
# -modcacherw: module cache files stay writable, so `rm -rf .cache` works.
case " ${GOFLAGS:-} " in
  *" -modcacherw "*) ;;
  *) export GOFLAGS="${GOFLAGS:+$GOFLAGS }-modcacherw" ;;
esac
mkdir -p "$GOMODCACHE" "$GOCACHE" "$OTELCOL_DIR/bin"

GO_VERSION="$(go version)"
STAMP="$( { cat "$MANIFEST"; printf '\n%s\nocb %s\n' "$GO_VERSION" "$OCB_VERSION"; } | sha256sum | cut -d' ' -f1)"

# One build at a time (parallel CI jobs, two shells); flock is optional.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$OTELCOL_DIR/.lock"
  flock 9
fi

if [ "$FORCE" -eq 0 ] && [ -x "$BIN_PATH" ] && [ -f "$STAMP_FILE" ] && [ "$(cat "$STAMP_FILE")" = "$STAMP" ]; then
  log "up to date ($BIN_PATH)"
  printf '%s\n' "$BIN_PATH"
  exit 0
fi

if [ ! -x "$OCB" ] || [ "$("$OCB" version 2>/dev/null | awk '{print $NF}')" != "$OCB_VERSION" ]; then
  log "installing ocb $OCB_VERSION into $OTELCOL_DIR/bin"
  GOBIN="$OTELCOL_DIR/bin" go install "go.opentelemetry.io/collector/cmd/builder@$OCB_VERSION" >&2
fi

log "building $BIN_NAME with $GO_VERSION (first build downloads a few hundred MB of modules and takes minutes)"
rm -f "$STAMP_FILE"
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
start=$(date +%s)
# ocb resolves dist.output_path against the cwd; default ldflags (-s -w).
(cd "$REPO_ROOT" && "$OCB" --config="$MANIFEST") >&2 || die "ocb failed (see the output above)"
[ -x "$BIN_PATH" ] || die "ocb finished but $BIN_PATH is missing"
printf '%s\n' "$STAMP" >"$STAMP_FILE"
log "built in $(( $(date +%s) - start ))s, $(du -h "$BIN_PATH" | cut -f1)"

printf '%s\n' "$BIN_PATH"
