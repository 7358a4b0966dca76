#!/usr/bin/env bash
# A one-machine Ray cluster (head only) that pipeline runs can join (ray.address=auto) or be
# submitted to as Ray jobs, with the dashboard and job server on 127.0.0.1:8265.
#
#   infra/local/start-ray-head.sh            # start
#   infra/local/start-ray-head.sh stop       # ray stop
#   visiontune run ray.address=auto tracking.uri=http://127.0.0.1:5000
#   RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 -- visiontune run ...
#
# Start it from the project's virtualenv: a job's `visiontune`/`python` comes from the PATH of
# the shell that ran `ray start`. Ray's workers inherit that shell's environment too: for
# ray.storage_path=s3://... export the AWS_* variables (AWS_ENDPOINT_URL for MinIO) before
# starting. A stock `ray start` with no custom resources. Token auth is on: the token is
# created once in ~/.ray/auth_token; `ray job` commands and the job SDK need RAY_AUTH_MODE=token.
set -euo pipefail

start() {
    command -v ray >/dev/null 2>&1 || {
        echo "error: 'ray' not found; activate the project's virtualenv" >&2
        exit 1
    }
    command -v visiontune >/dev/null 2>&1 ||
        echo "warning: 'visiontune' is not on PATH: jobs submitted to this cluster will not find it" >&2
    # Train V2 collects worker reports once per interval (2 s by default) and workers wait for
    # it: short epochs would be paced at 2 s each. Inherited by every worker of this node.
    export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.2}"
    export RAY_AUTH_MODE=token
    ray get-auth-token --generate >/dev/null
    ray start --head \
        --node-ip-address=127.0.0.1 \
        --port=6379 \
        --dashboard-host=127.0.0.1 \
        --include-dashboard=true
    echo
    echo "Ray head up; dashboard: http://127.0.0.1:8265"
    echo "  visiontune run ray.address=auto ..."
    echo "  export RAY_AUTH_MODE=token   # before 'ray job submit --address http://127.0.0.1:8265'"
}

case "${1:-start}" in
    start) start ;;
    stop) ray stop ;;
    -h|--help|help) echo "usage: $(basename "$0") [start|stop]" >&2 ;;
    *) echo "usage: $(basename "$0") [start|stop]" >&2; exit 2 ;;
esac
