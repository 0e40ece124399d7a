#!/usr/bin/env bash
# Memory of `trainmetrics serve` (TensorBoard every step), printed as markdown table rows
# (scripts/bench.sh prints the header):
#   - per live series: one process, 50 000 new series (one point each, OTLP/HTTP JSON in
#     requests of 10 000), then 50 000 more; once each half is written (its /metrics shows every
#     point delivered), VmRSS is read: (RSS after the second half - RSS after the first) / 50 000.
#     The second half reuses what the first left allocated for requests, so the difference is
#     what the live series themselves hold (decoder, windows, TensorBoard tags);
#   - per point in flight: 500 000 points (requests of 50 series x 100 steps, protobuf,
#     examples/otlp_load.rs) held in windows by a 10-minute reorder window:
#     (VmRSS with them held - VmRSS before) / points;
#   - peak RSS (VmHWM, read until the process has exited, shutdown included) under 100 000
#     series with the default max_series_per_run (10 000) and with the limit above the count.
#   scripts/bench-series.sh [BINARY]   (default target/release/trainmetrics; any build works)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${1:-target/release/trainmetrics}"
[ -x "$BIN" ] || { echo "bench-series.sh: missing component: $BIN (cargo build --locked --bin trainmetrics)" >&2; exit 1; }
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
LOAD=target/release/examples/otlp_load
tmp="$(mktemp -d)"
spid=""
cleanup() { if [ -n "$spid" ]; then kill -TERM "$spid" 2>/dev/null || true; fi; rm -rf "$tmp"; }
trap cleanup EXIT
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk "/^$2/ {print \$2}" "/proc/$1/status"; }

# Starts serve (extra --set arguments); sets spid, http (host:port) and tport (telemetry).
start() {
    tport="$(port)"
    "$BIN" serve \
        --set receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0 \
        --set receivers.otlp.protocols.http.endpoint=127.0.0.1:0 \
        --set "service.telemetry.endpoint=127.0.0.1:$tport" \
        --set "exporters.tensorboard.logdir=$tmp/runs" "$@" \
        >"$tmp/out" 2>"$tmp/err" &
    spid=$!
    until grep -q listening "$tmp/out" 2>/dev/null; do
        kill -0 "$spid" 2>/dev/null || { cat "$tmp/err" >&2; exit 1; }
        sleep 0.05
    done
    http="$(grep -o 'http=[^ ]*' "$tmp/out" | head -n1 | cut -d= -f2)"
}

# Stops serve; prints its peak RSS (KiB), read until it has exited.
stop() {
    local hwm=0 v
    kill -TERM "$spid"
    while kill -0 "$spid" 2>/dev/null; do
        v="$(rss_kib "$spid" VmHWM 2>/dev/null || true)"
        [ -n "$v" ] && hwm="$v"
        sleep 0.02
    done
    wait "$spid" || true
    spid=""
    rm -rf "$tmp/runs"
    echo "$hwm"
}

# Sends series FIRST..LAST-1 (one point each at step 1) in requests of 10 000.
send_series() {
    "$PY" - "$http" "$1" "$2" <<'EOF'
import json, sys, urllib.request
http, first, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for start in range(first, last, 10000):
    points = [{"asDouble": float(i), "timeUnixNano": "1790000000000000000",
               "attributes": [{"key": "step", "value": {"intValue": "1"}},
                              {"key": "k", "value": {"intValue": str(i)}}]}
              for i in range(start, min(last, start + 10000))]
    body = {"resourceMetrics": [{"resource": {"attributes": [
                {"key": "ml.run.name", "value": {"stringValue": "many-series"}}]},
            "scopeMetrics": [{"metrics": [{"name": "m", "gauge": {"dataPoints": points}}]}]}]}
    req = urllib.request.Request("http://%s/v1/metrics" % http, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    urllib.request.urlopen(req).read()
EOF
}

# Waits until the tensorboard exporter's /metrics shows $1 points delivered (or $2 = held:
# received, none delivered yet), then lets the allocator settle.
wait_for() {
    "$PY" - "$tport" "$1" "${2:-delivered}" <<'EOF'
import re, sys, time, urllib.request
port, want, what = sys.argv[1], int(sys.argv[2]), sys.argv[3]
name = "trainmetrics_exporter_points_" + ("delivered" if what == "delivered" else "received")
for _ in range(2400):
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    got = [float(v) for v in re.findall(name + r'_total\{exporter="tensorboard"\} (\S+)', text)]
    if got and got[0] >= want:
        break
    time.sleep(0.05)
else:
    sys.exit(f"bench-series.sh: {name} never reached {want}")
EOF
    sleep 0.5
}

# Per live series.
start --set exporters.tensorboard.max_series_per_run=1000000
send_series 0 50000; wait_for 50000
r1="$(rss_kib "$spid" VmRSS)"
send_series 50000 100000; wait_for 100000
r2="$(rss_kib "$spid" VmRSS)"
stop >/dev/null
echo "| serve memory per live series (RSS after 100 000 series - after 50 000) / 50 000 | $(( (r2 - r1) * 1024 / 50000 )) | B | RSS $((r1 / 1024)) MiB at 50 000 series, $((r2 / 1024)) MiB at 100 000; target <= 500 B |"

# Per point in flight.
if [ -x "$LOAD" ]; then
    start --set exporters.tensorboard.reorder_window=10m --set exporters.tensorboard.sending_queue.max_pending_points=1000000
    r1="$(rss_kib "$spid" VmRSS)"
    "$LOAD" --endpoint "http://$http/v1/metrics" --requests 100 >/dev/null
    wait_for 500000 received
    r2="$(rss_kib "$spid" VmRSS)"
    stop >/dev/null
    echo "| serve memory per point in flight (500 000 held by a reorder window) | $(( (r2 - r1) * 1024 / 500000 )) | B | RSS $((r1 / 1024)) MiB before, $((r2 / 1024)) MiB holding them; target <= 100 B |"
else
    echo "| serve memory per point in flight | n/a | B | not measured: missing component $LOAD (cargo build --release --example otlp_load) |"
fi

# Peak under 100 000 series, with and without the cardinality limit.
for limit in 10000 1000000; do
    start --set "exporters.tensorboard.max_series_per_run=$limit"
    send_series 0 100000
    hwm="$(stop)"; spid=""
    report="$(grep -E '^\s*tensorboard:' "$tmp/out" | sed 's/^ *//')"
    echo "| serve peak RSS, 100000 series, max_series_per_run=$limit | $((hwm / 1024)) | MiB | $report |"
done
