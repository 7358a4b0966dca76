#!/usr/bin/env bash
# An MLflow tracking server on this machine, for local Ray clusters and several concurrent
# pipeline runs (one SQLite file written by many trials is fine for one user; a server is the
# right backend when several processes log at once).
#
#   infra/local/start-mlflow.sh            # start (or report the running one), wait for /health
#   infra/local/start-mlflow.sh status
#   infra/local/start-mlflow.sh stop
#   visiontune run tracking.uri=http://127.0.0.1:5000
#
# Run it from the directory that should hold the data (the repository root, usually) with the
# project's virtualenv active: the store is sqlite:///$PWD/mlflow-server.db, artifacts go to
# $PWD/mlartifacts and are served through the server (--serve-artifacts), so Ray workers, whose
# working directories differ, upload through HTTP instead of writing to a relative path.
#
# `mlflow server` runs its web workers as child processes: killing its PID alone leaves them
# serving. It is started in its own session/process group (setsid) and `stop` ends the group.
#
# Environment: MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_BIN (mlflow),
# VISIONTUNE_MLFLOW_DIR (the current directory).
set -euo pipefail

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
MLFLOW_BIN="${MLFLOW_BIN:-mlflow}"
BASE_DIR="$(cd "${VISIONTUNE_MLFLOW_DIR:-$PWD}" && pwd)"
BACKEND_URI="sqlite:///${BASE_DIR}/mlflow-server.db"
ARTIFACTS_DIR="${BASE_DIR}/mlartifacts"
STATE_DIR="${BASE_DIR}/.cache/visiontune"
PID_FILE="${STATE_DIR}/mlflow-server.pid"   # holds the process group id (= the server's pid)
LOG_FILE="${STATE_DIR}/mlflow-server.log"
URL="http://${HOST}:${PORT}"

usage() {
    echo "usage: $(basename "$0") [start|stop|status]" >&2
}

group_alive() {
    # True while any process of the server's process group is left.
    [[ -f "$PID_FILE" ]] && kill -0 -- "-$(cat "$PID_FILE")" 2>/dev/null
}

healthy() {
    if command -v curl >/dev/null 2>&1; then
        curl -fsS --max-time 2 "${URL}/health" >/dev/null 2>&1
    else
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "${URL}/health" >/dev/null 2>&1
    fi
}

start() {
    if group_alive; then
        echo "MLflow server already running (process group $(cat "$PID_FILE")): ${URL}"
        return 0
    fi
    command -v "$MLFLOW_BIN" >/dev/null 2>&1 || {
        echo "error: '$MLFLOW_BIN' not found; activate the project's virtualenv" >&2
        exit 1
    }
    command -v setsid >/dev/null 2>&1 || {
        echo "error: setsid not found (util-linux)" >&2
        exit 1
    }
    mkdir -p "$STATE_DIR" "$ARTIFACTS_DIR"
    rm -f "$PID_FILE"   # stale: its group is gone
    # The inner shell records its own pid, which setsid has made a session and process group
    # leader, then execs the server in place: the pid file holds the group id. (Single quotes on
    # purpose: $$, $1 and $@ are the inner shell's.)
    # Without MLflow's server jobs (GenAI features visiontune does not use): no job runner and
    # no seven huey consumers beside the web worker (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true in
    # the environment turns them back on).
    # shellcheck disable=SC2016
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    setsid bash -c 'echo $$ > "$1"; shift; exec "$@"' _ "$PID_FILE" \
        "$MLFLOW_BIN" server \
        --host "$HOST" --port "$PORT" \
        --backend-store-uri "$BACKEND_URI" \
        --artifacts-destination "$ARTIFACTS_DIR" \
        --serve-artifacts \
        </dev/null >"$LOG_FILE" 2>&1 &
    echo "starting MLflow server (log: ${LOG_FILE}) ..."
    for _ in $(seq 1 90); do
        if healthy; then
            echo "MLflow server ready: ${URL} (process group $(cat "$PID_FILE"))"
            echo "  visiontune run tracking.uri=${URL}"
            return 0
        fi
        if [[ -f "$PID_FILE" ]] && ! group_alive; then
            echo "error: MLflow server exited; last lines of ${LOG_FILE}:" >&2
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            exit 1
        fi
        sleep 1
    done
    echo "error: no answer from ${URL}/health after 90 s; see ${LOG_FILE}" >&2
    exit 1
}

stop() {
    if ! group_alive; then
        echo "MLflow server not running"
        rm -f "$PID_FILE"
        return 0
    fi
    local pgid
    pgid="$(cat "$PID_FILE")"
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for _ in $(seq 1 20); do
        group_alive || break
        sleep 0.5
    done
    if group_alive; then
        kill -KILL -- "-$pgid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    echo "MLflow server stopped (process group $pgid)"
}

status() {
    if group_alive; then
        if healthy; then
            echo "running: ${URL} (process group $(cat "$PID_FILE"))"
        else
            echo "running, not answering ${URL}/health yet (process group $(cat "$PID_FILE"))"
        fi
    else
        echo "not running"
        return 3
    fi
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) status ;;
    -h|--help|help) usage ;;
    *) usage; exit 2 ;;
esac
