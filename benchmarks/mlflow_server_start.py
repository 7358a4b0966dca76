"""What an `mlflow server` costs to start, with MLflow's server jobs (its default: a job runner
and six huey consumers for GenAI jobs) and without them (`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=
false`, what visiontune's MLflow image, `infra/local/start-mlflow.sh` and the tests use).

Each variant, in turn, `--rounds` times: `mlflow server` (SQLite store and served artifacts in
a temporary folder, 1 web worker, 127.0.0.1) started in its own session; the seconds until
`/health` answers; then `--idle` seconds idle; the CPU-seconds of every process of the session
(user + system, read from /proc while they live) and how many there were; the session killed.

    python benchmarks/mlflow_server_start.py              # about a minute on 2 cores
    python benchmarks/mlflow_server_start.py --rounds 3 --idle 60

Results: benchmarks/results/mlflow_server_start.json (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")
VARIANTS = {"with server jobs (MLflow's default)": "true",
            "without (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false)": "false"}


def _session_cpu(sid: int, seen: dict[int, float]) -> None:
    """The CPU-seconds so far of each live process of session `sid`, into `seen`."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:   # fields after the name: state, ppid, pgrp, session, ...
            seen[int(pid)] = (int(fields[11]) + int(fields[12])) / TICK


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_start(jobs: str, idle_s: float) -> dict:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
             "--port", str(port), "--backend-store-uri", f"sqlite:///{tmp}/mlflow.db",
             "--artifacts-destination", f"{tmp}/artifacts", "--serve-artifacts",
             "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": jobs},
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen: dict[int, float] = {}
        began = time.monotonic()
        try:
            while True:
                _session_cpu(proc.pid, seen)
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.monotonic() - began > 180:
                        raise SystemExit(f"mlflow server did not start (jobs={jobs})")
                    time.sleep(0.2)
            up_s = time.monotonic() - began
            end = time.monotonic() + idle_s
            while time.monotonic() < end:
                _session_cpu(proc.pid, seen)
                time.sleep(0.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return {"up_s": round(up_s, 1), "cpu_s": round(sum(seen.values()), 1),
            "processes": len(seen)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--idle", type=float, default=20.0, help="seconds idle after /health")
    args = ap.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name, jobs in VARIANTS.items():   # the variants take turns
            results[name].append(one_start(jobs, args.idle))
            print(f"round {r + 1} {name}: {results[name][-1]}", flush=True)
    print(f"\nmlflow server, until /health and {args.idle:g} s idle "
          f"({os.cpu_count()} CPUs, {args.rounds} rounds):")
    for name, runs in results.items():
        cpu = sorted(x["cpu_s"] for x in runs)
        print(f"  {name}: {runs[0]['processes']} processes, CPU-seconds {cpu}, "
              f"up in {sorted(x['up_s'] for x in runs)} s")
    out = Path(__file__).parent / "results" / "mlflow_server_start.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"idle_s": args.idle, "cpus": os.cpu_count(),
                               "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
