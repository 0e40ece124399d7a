#!/usr/bin/env bash
# Local MLflow tracking server for the demo and for manual runs of the integration tests.
#   scripts/mlflow-server.sh start|stop|status [--port P] [--dir D]
# Defaults: port 5000, data dir .trainmetrics/mlflow (mlflow.db, artifacts/, server.log, server.pid).
# `start` prints the tracking URI (export it as MLFLOW_TRACKING_URI); it is a no-op when the
# server recorded in D is already healthy. Needs scripts/setup.sh to have been run.
set -euo pipefail
CALLER_PWD="$PWD"   # a relative --dir means relative to where the user is, not the repo
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

usage() { echo "usage: $0 start|stop|status [--port P] [--dir D]" >&2; exit 2; }
[ $# -ge 1 ] || usage
cmd="$1"; shift
PORT=5000
DIR="$ROOT/.trainmetrics/mlflow"
while [ $# -gt 0 ]; do
    case "$1" in
        --port) [ $# -ge 2 ] || usage; PORT="$2"; shift 2 ;;
        --dir) [ $# -ge 2 ] || usage; DIR="$2"; [[ "$DIR" = /* ]] || DIR="$CALLER_PWD/$DIR"; shift 2 ;;
        *) usage ;;
    esac
done
if [ "$cmd" = start ]; then mkdir -p "$DIR"; fi
[ -d "$DIR" ] || { echo "mlflow-server.sh: not running (no $DIR)"; [ "$cmd" = stop ]; exit; }
DIR="$(cd "$DIR" && pwd -P)"   # sqlite:/// wants an absolute path
PIDFILE="$DIR/server.pid"   # "PID PORT": stop/status must not depend on --port being repeated
LOG="$DIR/server.log"
PY="$ROOT/.venv/bin/python"

# The server is started as its own process group leader, so its PID is also the PGID and
# one signal to the group reaches the mlflow CLI and its uvicorn child.
recorded_pid() { [ -f "$PIDFILE" ] && awk '{print $1}' "$PIDFILE" || true; }
recorded_port() { [ -f "$PIDFILE" ] && awk '{print $2}' "$PIDFILE" || true; }
# A stale pid file must not make us signal an unrelated group that reused the PID.
group_alive() {
    [ -n "$1" ] && kill -0 -- "-$1" 2>/dev/null || return 1
    [ ! -r "/proc/$1/cmdline" ] || grep -qa mlflow "/proc/$1/cmdline"
}
healthy() {
    "$PY" -c 'import sys, urllib.request as u; u.urlopen("http://127.0.0.1:%s/health" % sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

start() {
    local pid; pid="$(recorded_pid)"
    if group_alive "$pid"; then
        local port; port="$(recorded_port)"
        [ "$port" = "$PORT" ] || echo "mlflow-server.sh: note: running server uses port $port, not $PORT" >&2
        PORT="$port"
        wait_healthy "$pid"   # may still be starting from an earlier call
        echo "mlflow-server.sh: already running (pid $pid)"
        echo "http://127.0.0.1:$PORT"
        return
    fi
    [ -x "$PY" ] || { echo "mlflow-server.sh: $PY missing; run scripts/setup.sh first" >&2; exit 1; }
    if healthy "$PORT"; then
        echo "mlflow-server.sh: something not started from $DIR already answers on port $PORT" >&2
        exit 1
    fi
    echo "mlflow-server.sh: starting on 127.0.0.1:$PORT, data in $DIR (log: $LOG)"
    # setsid: own session and process group. The job runner is off: the tracking API does not
    # use it, and it costs 8 extra processes (~550 MB) plus a temp dir in /dev/shm.
    (cd "$DIR" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec setsid "$PY" -m mlflow server \
        --host 127.0.0.1 --port "$PORT" \
        --backend-store-uri "sqlite:///$DIR/mlflow.db" \
        --artifacts-destination "$DIR/artifacts" \
        --workers 1 \
        </dev/null >>"$LOG" 2>&1) &
    pid=$!
    echo "$pid $PORT" > "$PIDFILE"
    local t0=$SECONDS
    wait_healthy "$pid"
    echo "mlflow-server.sh: healthy after $((SECONDS - t0))s (pid $pid)"
    echo "http://127.0.0.1:$PORT"
}

wait_healthy() {
    local pid="$1" deadline=$((SECONDS + 120))
    until healthy "$PORT"; do
        if ! group_alive "$pid" || [ $SECONDS -ge $deadline ]; then
            echo "mlflow-server.sh: server did not become healthy on port $PORT; log tail:" >&2
            tail -n 30 "$LOG" >&2 || true
            stop >/dev/null
            exit 1
        fi
        sleep 0.5
    done
}

stop() {
    local pid; pid="$(recorded_pid)"
    if ! group_alive "$pid"; then
        echo "mlflow-server.sh: not running"
        rm -f "$PIDFILE"
        return
    fi
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do group_alive "$pid" || break; sleep 0.2; done
    if group_alive "$pid"; then kill -KILL -- "-$pid" 2>/dev/null || true; fi
    rm -f "$PIDFILE"
    echo "mlflow-server.sh: stopped (pid $pid)"
}

status() {
    local pid; pid="$(recorded_pid)"
    if ! group_alive "$pid"; then echo "mlflow-server.sh: not running"; exit 1; fi
    PORT="$(recorded_port)"
    if healthy "$PORT"; then
        echo "mlflow-server.sh: running (pid $pid), healthy"
        echo "http://127.0.0.1:$PORT"
    else
        echo "mlflow-server.sh: running (pid $pid) but not answering on port $PORT yet"; exit 1
    fi
}

case "$cmd" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
