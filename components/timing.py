"""Start-up marks for `benchmarks/trial_overhead.py`: with VISIONTUNE_TIMINGS naming a file,
`mark(event, ...)` appends one JSON line (event, wall-clock time, pid, fields) to it from any
process of the run (the trial actors and Train workers of a local Ray inherit the variable);
without it, `mark` returns at once and nothing is written."""

from __future__ import annotations

import json
import os
import time

ENV = "VISIONTUNE_TIMINGS"


def enabled() -> bool:
    return bool(os.environ.get(ENV))


def mark(event: str, at: float | None = None, **fields) -> None:
    path = os.environ.get(ENV)
    if not path:
        return
    line = json.dumps({"event": event, "t": time.time() if at is None else at,
                       "pid": os.getpid(), **fields}, default=str)
    # One short write in append mode: lines from concurrent processes do not interleave.
    with open(path, "a") as f:
        f.write(line + "\n")


def read_marks(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
