"""What the benchmarks that run `visiontune` share: one `visiontune run` as a user types it,
in a fresh temporary folder, read back through MLflow; and the results file they write."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@contextlib.contextmanager
def pipeline_run(*args: str, prefix: str = "visiontune-bench-"):
    """`visiontune run ARGS` in its own temporary folder (./mlflow.db there); yields
    (client, parent run, child runs, stdout, wall seconds) while the folder exists. A failed
    run ends the benchmark with its output."""
    from mlflow import MlflowClient

    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        env.pop("RAY_ADDRESS", None)
        env.pop("MLFLOW_TRACKING_URI", None)
        began = time.monotonic()
        p = subprocess.run([str(BIN / "visiontune"), "run", *args], cwd=d, env=env,
                           capture_output=True, text=True)
        wall = time.monotonic() - began
        if p.returncode != 0:
            sys.exit(f"visiontune run failed ({p.returncode}):\n{p.stdout[-3000:]}"
                     f"\n{p.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{d}/mlflow.db")
        exp = client.get_experiment_by_name("visiontune")
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        yield client, parent, children, p.stdout, wall


def save_results(name: str, results) -> Path:
    """benchmarks/results/NAME.json with the machine and the date; prints where."""
    out = ROOT / "benchmarks" / "results" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                               "date": time.strftime("%Y-%m-%d"), "results": results},
                              indent=1))
    print(f"results: {out}")
    return out
