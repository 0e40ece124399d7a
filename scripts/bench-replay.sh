#!/usr/bin/env bash
# Collector replay after a long outage of `trainmetrics serve` (not run in CI; case 013 at scale).
# A trainer (Python, OTLP/HTTP protobuf) sends one request of 50 series x 100 steps every
# PACE seconds to a real collector (collector-config/agent.yaml: persistent queue, default
# consumers); `serve` (collector-config/trainmetrics.yaml's TensorBoard exporter: every step,
# reorder_window 5s; plus its MLflow exporter when MLFLOW_TRACKING_URI is set) is stopped after
# 2 requests for OUTAGE seconds while the trainer goes on, then started again. Prints what the
# restarted serve received / delivered / dropped (late included) and its peak RSS (VmHWM).
#   scripts/bench-replay.sh [BINARY]     OUTAGE=600 PACE=2 (defaults)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${1:-target/release/trainmetrics}"
[ -x "$BIN" ] || { echo "bench-replay.sh: missing component: $BIN (cargo build --locked --release --bin trainmetrics)" >&2; exit 1; }
OUTAGE="${OUTAGE:-600}"
PACE="${PACE:-2}"
PY=.venv/bin/python
[ -x "$PY" ] || { echo "bench-replay.sh: missing component: $PY (scripts/setup.sh)" >&2; exit 1; }
OTELCOL="$(scripts/build-collector.sh)"
tmp="$(mktemp -d)"
port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
GRPC="$(port)"; CG="$(port)"; CH="$(port)"; CM="$(port)"
cfg="$tmp/serve.yaml"
{
    echo "exporters:"
    echo "  tensorboard: {logdir: $tmp/runs, every_steps: 1, reorder_window: 5s}"
    if [ -n "${MLFLOW_TRACKING_URI:-}" ]; then
        echo "  mlflow: {tracking_uri: $MLFLOW_TRACKING_URI, every_steps: 100, reorder_window: 5s, aggregation: last, metrics: {train.loss: mean}, sending_queue: {spool: {directory: $tmp/spool}}}"
    fi
} >"$cfg"
start_serve() {
    "$BIN" serve --config "$cfg" --set "receivers.otlp.protocols.grpc.endpoint=127.0.0.1:$GRPC" \
        --set receivers.otlp.protocols.http.endpoint=127.0.0.1:0 --set service.telemetry.endpoint=127.0.0.1:0 \
        >"$tmp/serve-$1.out" 2>"$tmp/serve-$1.err" &
    echo $!
}
hwm_until_exit() {
    local pid="$1" hwm=0 v
    while kill -0 "$pid" 2>/dev/null; do
        v="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)"
        [ -n "$v" ] && hwm="$v"
        sleep 0.2
    done
    echo "$hwm"
}
serve1="$(start_serve 1)"
until grep -q listening "$tmp/serve-1.out" 2>/dev/null; do sleep 0.1; done
OTELCOL_GRPC_ENDPOINT="127.0.0.1:$CG" OTELCOL_HTTP_ENDPOINT="127.0.0.1:$CH" OTELCOL_QUEUE_DIR="$tmp/queue" \
    OTELCOL_METRICS_LEVEL=basic OTELCOL_METRICS_PORT="$CM" TRAINMETRICS_GRPC_ENDPOINT="127.0.0.1:$GRPC" \
    "$OTELCOL" --config=collector-config/agent.yaml >/dev/null 2>"$tmp/collector.log" &
col=$!
trap 'kill "$col" 2>/dev/null || true; kill "$serve1" 2>/dev/null || true; kill "${serve2:-}" 2>/dev/null || true' EXIT
until "$PY" -c "import socket; socket.create_connection(('127.0.0.1', $CH))" 2>/dev/null; do sleep 0.1; done
send() { # first request index, count, pace
    "$PY" - "$CH" "$1" "$2" "$3" <<'EOF'
import sys, time, urllib.request
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
port, first, count, pace = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
names = ["train.loss"] + [f"metric.{i:02}" for i in range(1, 50)]
for k in range(first, first + count):
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    for key, v in [("ml.run.name", "replay"), ("ml.run.id", "bench-replay")]:
        rm.resource.attributes.append(KeyValue(key=key, value=AnyValue(string_value=v)))
    sm = rm.scope_metrics.add()
    for i, n in enumerate(names):
        m = sm.metrics.add(name=n)
        for step in range(k * 100 + 1, k * 100 + 101):
            dp = m.gauge.data_points.add(time_unix_nano=1_790_000_000_000_000_000 + step * 1_000_000, as_double=step + i / 64)
            dp.attributes.append(KeyValue(key="step", value=AnyValue(int_value=step)))
    r = urllib.request.Request(f"http://127.0.0.1:{port}/v1/metrics", data=req.SerializeToString(),
                               headers={"Content-Type": "application/x-protobuf"})
    urllib.request.urlopen(r).read()
    time.sleep(pace)
EOF
}
sent() { curl -s "http://127.0.0.1:$CM/metrics" | awk '/^otelcol_exporter_sent_metric_points/ {s += $NF} END {print s + 0}'; }
send 0 2 0
until [ "$(sent)" -ge 10000 ]; do sleep 0.2; done
kill -TERM "$serve1"; wait "$serve1" || true
down=$(date +%s)
n=$(( OUTAGE / PACE )); [ "$n" -ge 1 ] || n=1
send 2 "$n" "$PACE"
sleep $(( OUTAGE - ($(date +%s) - down) > 0 ? OUTAGE - ($(date +%s) - down) : 0 ))
echo "serve down for $(( $(date +%s) - down )) s; $n requests ($(( n * 5000 )) points) queued in the collector" >&2
serve2="$(start_serve 2)"
until grep -q listening "$tmp/serve-2.out" 2>/dev/null; do sleep 0.1; done
back=$(date +%s)
total=$(( (n + 2) * 5000 ))
until [ "$(sent)" -ge "$total" ]; do sleep 0.5; done
echo "replayed in $(( $(date +%s) - back )) s" >&2
kill -TERM "$col"; wait "$col" || true
kill -TERM "$serve2"
hwm="$(hwm_until_exit "$serve2")"
wait "$serve2" || true
echo "| outage | points replayed | report of the restarted serve | peak RSS |"
echo "|---|---|---|---|"
grep -E '^\s+(tensorboard|mlflow):' "$tmp/serve-2.out" | while read -r line; do
    echo "| ${OUTAGE} s | $(( n * 5000 )) | $line | $(( hwm / 1024 )) MiB |"
done
