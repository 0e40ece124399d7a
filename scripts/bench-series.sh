#!/usr/bin/env bash
# Peak memory of `trainmetrics serve` under 100 000 distinct series (one point each, OTLP/HTTP
# JSON in 10 requests of 10 000), with the default max_series_per_run (10 000) and with the
# limit raised above the series count (as if there were none). Peak RSS is VmHWM from
# /proc/<pid>/status, read until the process has exited after SIGTERM (so delivery and shutdown
# are included). Prints markdown table rows (scripts/bench.sh prints the header).
#   scripts/bench-series.sh [BINARY]   (default target/release/trainmetrics; any build works)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${1:-target/release/trainmetrics}"
[ -x "$BIN" ] || { echo "bench-series.sh: missing component: $BIN (cargo build --locked --bin trainmetrics)" >&2; exit 1; }
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
SERIES=100000

measure() {
    local limit="$1" tmp out pid hwm=0
    tmp="$(mktemp -d)"
    out="$tmp/out"
    "$BIN" serve \
        --set receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0 \
        --set receivers.otlp.protocols.http.endpoint=127.0.0.1:0 \
        --set "exporters.tensorboard.logdir=$tmp/runs" \
        --set "exporters.tensorboard.max_series_per_run=$limit" \
        >"$out" 2>"$tmp/err" &
    pid=$!
    until grep -q listening "$out" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || { cat "$tmp/err" >&2; exit 1; }
        sleep 0.05
    done
    local http; http="$(grep -o 'http=[^ ]*' "$out" | head -n1 | cut -d= -f2)"
    "$PY" - "$http" "$SERIES" <<'EOF'
import json, sys, urllib.request
http, n = sys.argv[1], int(sys.argv[2])
chunk = 10000
for start in range(0, n, chunk):
    points = [{"asDouble": float(i), "timeUnixNano": "1790000000000000000",
               "attributes": [{"key": "step", "value": {"intValue": "1"}},
                              {"key": "k", "value": {"intValue": str(i)}}]}
              for i in range(start, min(n, start + chunk))]
    body = {"resourceMetrics": [{"resource": {"attributes": [
                {"key": "ml.run.name", "value": {"stringValue": "many-series"}}]},
            "scopeMetrics": [{"metrics": [{"name": "m", "gauge": {"dataPoints": points}}]}]}]}
    req = urllib.request.Request("http://%s/v1/metrics" % http, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
EOF
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do
        local v; v="$(awk '/^VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
        [ -n "$v" ] && hwm="$v"
        sleep 0.02
    done
    wait "$pid" || true
    local report; report="$(grep -E '^\s*tensorboard:' "$out" | sed 's/^ *//')"
    echo "| serve peak RSS, $SERIES series, max_series_per_run=$limit | $((hwm / 1024)) | MiB | $report |"
    rm -rf "$tmp"
}

measure 10000
measure 1000000
