"""Start-up marks for `benchmarks/trial_overhead.py`: with VISIONTUNE_TIMINGS naming a file,
`mark(event, ...)` appends one JSON line (event, wall-clock time, pid, fields) to it from any
process of the run (the trial actors and Train workers of a local Ray inherit the variable);
without it, `mark` returns at once and nothing is written. `timed` measures the spans a mark
carries (an epoch's train, validation, logging, checkpoint and report seconds)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def timed(spans: dict[str, float], key: str) -> Iterator[None]:
    """Adds the block's wall seconds to `spans[key]` (also when it raises)."""
    start = time.monotonic()
    try:
        yield
    finally:
        spans[key] = spans.get(key, 0.0) + time.monotonic() - start


def read_marks(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
