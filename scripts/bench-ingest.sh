#!/usr/bin/env bash
# `trainmetrics serve` against the Collector built here, on the same OTLP/HTTP load in the same
# run (examples/otlp_load.rs: requests of 50 series x 100 steps, protobuf, 2 senders). Rows:
#   - the Collector (collector-config/bench.yaml: otlp receiver -> batch -> debug);
#   - serve with TensorBoard every step;
#   - serve with TensorBoard every step and MLflow every 100 steps (a real server on 127.0.0.1).
# CPU per point is the process's utime+stime (/proc/<pid>/stat) from just before the load until
# every point is delivered (serve: its /metrics shows every point delivered and nothing pending;
# the Collector: its CPU stops moving), divided by the points sent. Peak RSS is VmHWM.
# Prints markdown table rows (scripts/bench.sh prints the header; alone, add --header).
#   scripts/bench-ingest.sh [--header] [--requests N]    (default 400 = 2 000 000 points)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
HEADER=0; REQUESTS=400
while [ $# -gt 0 ]; do
    case "$1" in
        --header) HEADER=1; shift ;;
        --requests) REQUESTS="$2"; shift 2 ;;
        *) echo "bench-ingest.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
PY=.venv/bin/python
[ -x "$PY" ] || { echo "bench-ingest.sh: missing component: $PY (scripts/setup.sh)" >&2; exit 1; }
OTELCOL="$(scripts/build-collector.sh)"
[ -x "$OTELCOL" ] || { echo "bench-ingest.sh: missing component: the collector ($OTELCOL)" >&2; exit 1; }
cargo build --release --locked -q --bin trainmetrics --example otlp_load
BIN=target/release/trainmetrics
LOAD=target/release/examples/otlp_load
TICK="$(getconf CLK_TCK)"
tmp="$(mktemp -d)"
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    scripts/mlflow-server.sh stop --dir "$tmp/mlflow" >/dev/null 2>&1 || true
    rm -rf "$tmp"
}
trap cleanup EXIT
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
wait_port() { until "$PY" -c "import socket,sys; socket.create_connection(('127.0.0.1',$1),0.2)" 2>/dev/null; do sleep 0.05; done; }
[ "$HEADER" = 1 ] && { echo "| benchmark | value | unit | note |"; echo "|---|---|---|---|"; }

# One row: load the process at $1 (pid) through http port $2, then wait with $3 (a command).
measure() {
    local name="$1" pid="$2" port="$3" waiter="$4"
    local c0 c1 out pts secs rate retries cpu_us
    c0="$(cpu_ticks "$pid")"
    out="$("$LOAD" --endpoint "http://127.0.0.1:$port/v1/metrics" --requests "$REQUESTS")"
    "$waiter"
    c1="$(cpu_ticks "$pid")"
    pts="$(awk '/^points / {print $2}' <<<"$out")"
    secs="$(awk '/^seconds / {print $2}' <<<"$out")"
    rate="$(awk '/^points_per_s / {print $2}' <<<"$out")"
    retries="$(awk '/^retries / {print $2}' <<<"$out")"
    cpu_us="$(awk -v a="$c0" -v b="$c1" -v t="$TICK" -v n="$pts" 'BEGIN {printf "%.3f", (b - a) / t * 1e6 / n}')"
    echo "| ingest CPU per point, $name | $cpu_us | us | $pts points in ${secs}s ($rate points/s), $retries retries (503), peak RSS $(( $(hwm_kib "$pid") / 1024 )) MiB |"
    echo "$cpu_us" >"$tmp/last_cpu"
}

# The Collector: done when its CPU has not moved for 1 s (the batch timeout is 200 ms).
collector_idle() {
    local a b; b="$(cpu_ticks "$cpid")"
    while :; do sleep 1; a="$b"; b="$(cpu_ticks "$cpid")"; [ "$a" = "$b" ] && break; done
}
cport="$(port)"
OTELCOL_HTTP_ENDPOINT="127.0.0.1:$cport" "$OTELCOL" --config=collector-config/bench.yaml >"$tmp/otelcol.log" 2>&1 &
cpid=$!; pids+=("$cpid")
wait_port "$cport"
measure "Collector (otlp -> batch -> debug)" "$cpid" "$cport" collector_idle
collector_cpu="$(cat "$tmp/last_cpu")"
kill -TERM "$cpid"; wait "$cpid" 2>/dev/null || true

# serve: done when every exporter has delivered every point and holds none.
serve_done() {
    "$PY" - "$tport" "$(( REQUESTS / 2 * 2 * 5000 ))" <<'EOF'
import re, sys, time, urllib.request
port, want = sys.argv[1], int(sys.argv[2])
while True:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    def per(name):
        return {m[0]: float(m[1]) for m in re.findall(name + r'_total\{exporter="([^"]+)"\} (\S+)', text)}
    got, dropped = per("trainmetrics_exporter_points_delivered"), {}
    for m in re.findall(r'trainmetrics_exporter_points_dropped_total\{exporter="([^"]+)",[^}]*\} (\S+)', text):
        dropped[m[0]] = dropped.get(m[0], 0) + float(m[1])
    pending = [float(v) for v in re.findall(r'trainmetrics_exporter_queue_points\{[^}]*\} (\S+)', text)]
    if got and all(got[e] + dropped.get(e, 0) >= want for e in got) and not any(pending):
        break
    time.sleep(0.05)
EOF
}
serve_row() {
    local name="$1" cfg="$2"
    local hport; hport="$(port)"; tport="$(port)"
    "$BIN" serve --config "$cfg" \
        --set "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:0" \
        --set "receivers.otlp.protocols.http.endpoint=127.0.0.1:$hport" \
        --set "service.telemetry.endpoint=127.0.0.1:$tport" >"$tmp/serve.out" 2>"$tmp/serve.err" &
    local spid=$!; pids+=("$spid")
    until grep -q listening "$tmp/serve.out" 2>/dev/null; do
        kill -0 "$spid" 2>/dev/null || { cat "$tmp/serve.err" >&2; exit 1; }
        sleep 0.05
    done
    measure "$name" "$spid" "$hport" serve_done
    local ratio; ratio="$(awk -v a="$(cat "$tmp/last_cpu")" -v b="$collector_cpu" 'BEGIN {printf "%.2f", a / b}')"
    echo "| ingest CPU per point, $name / Collector | $ratio | x | same load, same run; target <= 0.5 for TensorBoard alone |"
    kill -TERM "$spid"; wait "$spid" 2>/dev/null || true
    rm -rf "$tmp/runs" "$tmp/spool"
}
printf 'exporters:\n  tensorboard: {logdir: %s/runs, every_steps: 1}\n' "$tmp" >"$tmp/tb.yaml"
serve_row "serve, TensorBoard every step" "$tmp/tb.yaml"
uri="$(scripts/mlflow-server.sh start --port "$(port)" --dir "$tmp/mlflow" | tail -n 1)"
printf 'exporters:\n  tensorboard: {logdir: %s/runs, every_steps: 1}\n  mlflow: {tracking_uri: "%s", every_steps: 100, sending_queue: {spool: {directory: %s/spool}}}\n' "$tmp" "$uri" "$tmp" >"$tmp/both.yaml"
serve_row "serve, TensorBoard every step + MLflow every 100" "$tmp/both.yaml"
