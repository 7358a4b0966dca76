"""How fast and how big a registered model is, measured the way it serves: loaded with
`mlflow.pyfunc.load_model` from its downloaded folder and called with `predict` on a DataFrame
of image file bytes, so the numbers include decoding and preprocessing, not only the network's
forward pass. Recorded as version tags (`speed.*`) so that `promote` can compare a challenger
with the champion without loading either.

No ray, and mlflow, torch, numpy, PIL and pandas only inside the functions: importing this
module costs nothing to a command that only reads the tags back.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from components.serving import WEIGHTS_FILE

BATCHES = (1, 32)
TAG_PREFIX = "speed."
HARDWARE_TAG = TAG_PREFIX + "hardware"
# Counts, not measurements: written as integers, not rounded to 4 digits.
_INT_METRICS = ("model_bytes", "parameters")


@dataclass
class Speed:
    metrics: dict[str, float]
    hardware: str

    def tags(self) -> dict[str, str]:
        """Model version tags: MLflow tags are strings, 4 significant digits are all the
        precision a timing on a shared machine has."""
        out = {TAG_PREFIX + k: (str(int(v)) if k in _INT_METRICS else f"{v:.4g}")
               for k, v in self.metrics.items()}
        out[HARDWARE_TAG] = self.hardware
        return out


def hardware_name() -> str:
    """What the numbers were measured on: a timing means nothing without the machine."""
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.lower().startswith("model name")), "")
    except OSError:  # not Linux
        pass
    cpu = cpu or platform.processor() or platform.machine()
    if torch.cuda.is_available():
        # The pyfunc's network runs on the CPU wherever it is served: a GPU beside it does
        # not explain the numbers, but a reader should not think it was forgotten.
        gpu = (f"GPU {torch.cuda.get_device_name(0)} present, not used: the served model "
               f"runs on the CPU")
    else:
        gpu = "no GPU"
    return (f"CPU: {cpu} {platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.get_num_threads()} threads; {gpu}")


def model_size(model_dir: str | Path) -> dict[str, float]:
    """Bytes of every file of the downloaded model (what a server downloads before its first
    answer) and the number of the network's parameters and buffers."""
    import torch

    root = Path(model_dir)
    out = {"model_bytes": float(sum(f.stat().st_size for f in root.rglob("*") if f.is_file()))}
    # Searched for, not assumed at artifacts/: older versions kept the network elsewhere.
    network = next(iter(sorted(root.rglob(WEIGHTS_FILE))), None)
    if network is not None:
        state = torch.export.load(str(network)).state_dict
        out["parameters"] = float(sum(t.numel() for t in state.values()))
    return out


def noise_png(channels: int, image_size: int, seed: int = 0) -> bytes:
    """A PNG of seeded random noise: a flat image would compress to nothing and decode faster
    than any real photo, flattering the model."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (image_size, image_size) if channels == 1 else (image_size, image_size, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _check_rows(result, b: int) -> None:
    """A model that cannot classify its own input is broken, not slow: refuse to time it."""
    errors = [e for e in result["error"].tolist() if e is not None]
    if len(result) != b or errors:
        raise RuntimeError(f"the model did not classify a batch of {b} images: "
                           f"{errors[0] if errors else f'{len(result)} rows returned'}")


def measure_speed(model_dir: str | Path, *, batches=BATCHES, seconds_per_batch: float = 1.0,
                  min_runs: int = 5, max_runs: int = 200,
                  images: list[bytes] | None = None) -> Speed:
    """Latency percentiles and throughput of `predict` for each batch size in `batches`, plus
    `model_size`. Each batch size gets one untimed warm-up call (first-call allocations and
    lazy initialisation are not what a serving model pays per request), then is repeated
    until `seconds_per_batch` have passed and `min_runs` calls ran, at most `max_runs`."""
    import mlflow
    import numpy as np
    import pandas as pd

    model_dir = str(model_dir)
    model = mlflow.pyfunc.load_model(model_dir)
    if not images:
        prep = (mlflow.models.Model.load(model_dir).metadata or {}).get("preprocessing")
        if not prep:
            raise ValueError(f"{model_dir}: no metadata['preprocessing'] in its MLmodel to "
                             f"size the test images by; pass images=")
        images = [noise_png(int(prep["channels"]), int(prep["image_size"]))]
    metrics: dict[str, float] = {}
    for b in batches:
        frame = pd.DataFrame({"image": [images[i % len(images)] for i in range(b)]})
        _check_rows(model.predict(frame), b)
        latencies: list[float] = []
        while len(latencies) < max_runs and (len(latencies) < min_runs
                                             or sum(latencies) < seconds_per_batch):
            start = time.perf_counter()
            result = model.predict(frame)
            latencies.append(time.perf_counter() - start)
            _check_rows(result, b)
        ms = np.array(latencies) * 1000.0
        metrics[f"latency_p50_ms_batch{b}"] = float(np.percentile(ms, 50))
        metrics[f"latency_p95_ms_batch{b}"] = float(np.percentile(ms, 95))
        # From the median call, not the total: on a shared machine a burst of other work
        # slows a few calls tenfold, and the mean would report the burst.
        metrics[f"images_per_s_batch{b}"] = b / float(np.percentile(latencies, 50))
    metrics.update(model_size(model_dir))
    return Speed(metrics=metrics, hardware=hardware_name())


def speed_of(tags: dict) -> dict[str, float]:
    """The numeric metrics back from a version's tags (Speed.tags' inverse); a tag that is
    missing or not a number is left out, never guessed."""
    out = {}
    for key, value in (tags or {}).items():
        if key.startswith(TAG_PREFIX) and key != HARDWARE_TAG:
            try:
                out[key[len(TAG_PREFIX):]] = float(value)
            except (TypeError, ValueError):
                continue
    return out


def _sig3(x: float) -> str:
    """3 significant digits without an exponent: 812, 1.98, 0.420, 106."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, 2 - math.floor(math.log10(abs(x))))}f}"


def _ratio(mine: float, theirs: float, more: str, less: str) -> str:
    """'1.98x faster': the ratio is always >= 1, the word says which way; within 1%, same."""
    if mine <= 0 or theirs <= 0:
        return "n/a"
    r = mine / theirs
    if abs(r - 1) <= 0.01:
        return "same"
    return f"{_sig3(max(r, 1 / r))}x {more if r > 1 else less}"


def compare_line(challenger: dict[str, float], champion: dict[str, float]) -> str | None:
    """One line for `promote` from two `speed_of` dicts; None when either was not measured
    at batch 32 (no throughput to compare)."""
    key = "images_per_s_batch32"
    if key not in challenger or key not in champion:
        return None
    a, c = challenger[key], champion[key]
    parts = [f"speed (CPU, batch 32): challenger {_sig3(a)} images/s, champion {_sig3(c)} "
             f"images/s ({_ratio(a, c, 'faster', 'slower')})"]
    p50 = "latency_p50_ms_batch1"
    if p50 in challenger and p50 in champion:
        parts.append(f"p50 batch 1: {_sig3(challenger[p50])} ms vs {_sig3(champion[p50])} ms")
    if "model_bytes" in challenger and "model_bytes" in champion:
        a, c = challenger["model_bytes"], champion["model_bytes"]
        size = (f"size: {_sig3(a / 1e6)} MB vs {_sig3(c / 1e6)} MB "
                f"({_ratio(a, c, 'larger', 'smaller')})")
        if "parameters" in challenger and "parameters" in champion:
            size += (f", {_sig3(challenger['parameters'] / 1e6)} M vs "
                     f"{_sig3(champion['parameters'] / 1e6)} M parameters")
        parts.append(size)
    return "; ".join(parts)
