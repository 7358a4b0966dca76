"""components/serving/speed.py on real registered models (a small CNN and an untrained
resnet18, SQLite store, no server): its timings against the test's own, its sizes against
os.walk and the exported program, the tags it writes read back, the line `promote` prints, and
a broken model refused rather than timed."""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.serving import WEIGHTS_FILE
from components.serving.speed import (
    BATCHES,
    TAG_PREFIX,
    Speed,
    compare_line,
    hardware_name,
    measure_speed,
    model_size,
    speed_of,
)
from tests.conftest import register_untrained_model

KINDS = {"small": {}, "big": {"model": "resnet18"}}


pytestmark = pytest.mark.timed   # latencies against a timing of the test's own


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, dict]:
    """Each kind registered, downloaded and measured once: {kind: {"dir", "speed"}}."""
    import mlflow

    tmp = tmp_path_factory.mktemp("speed")
    uri = f"sqlite:///{tmp}/mlflow.db"
    out = {}
    try:
        for kind, extra in KINDS.items():
            name = f"speed-test-{kind}"
            version = register_untrained_model(uri, name, artifact_location=str(tmp / "mlruns"),
                                               **extra)
            mlflow.set_tracking_uri(uri)
            folder = mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp / kind))
            out[kind] = {"dir": Path(folder),
                         "speed": measure_speed(folder, seconds_per_batch=0.5)}
    finally:
        mlflow.set_tracking_uri(None)  # later tests choose their own store
    return out


def _noise_png(size: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", list(KINDS))
def test_latency_and_throughput_match_a_timing_of_our_own(models, kind):
    import mlflow

    m = models[kind]["speed"].metrics
    for b in BATCHES:
        for key in (f"latency_p50_ms_batch{b}", f"latency_p95_ms_batch{b}",
                    f"images_per_s_batch{b}"):
            assert m[key] > 0, key
        assert m[f"latency_p95_ms_batch{b}"] >= m[f"latency_p50_ms_batch{b}"]
    model = mlflow.pyfunc.load_model(str(models[kind]["dir"]))
    frame = pd.DataFrame({"image": [_noise_png(16)] * 32})  # image_size 16: the fixture's
    assert model.predict(frame)["error"].isna().all()      # warm-up, untimed
    # This machine's 2 cores are shared with other processes: a burst of their work slows
    # torch's spinning threads tenfold for a moment. A few tries, each measuring both ways
    # back to back; one that agrees shows the two compute the same thing.
    tries = []
    for attempt in range(4):
        if attempt:
            m = measure_speed(models[kind]["dir"], batches=(32,), seconds_per_batch=0.5).metrics
        total = 0.0
        for _ in range(5):
            start = time.perf_counter()
            model.predict(frame)
            total += time.perf_counter() - start
        ours = 32 * 5 / total
        tries.append((m["images_per_s_batch32"], ours))
        if ours / 3 <= m["images_per_s_batch32"] <= ours * 3:
            break
    else:
        pytest.fail(f"images/s at batch 32 (measured, ours): {tries}")


def test_size_is_every_file_and_every_parameter(models):
    for kind in KINDS:
        folder, m = models[kind]["dir"], models[kind]["speed"].metrics
        walked = sum(os.path.getsize(os.path.join(d, f))
                     for d, _, files in os.walk(folder) for f in files)
        assert m["model_bytes"] == walked
        net = torch.export.load(str(folder / "artifacts" / WEIGHTS_FILE)).module()
        counted = sum(p.numel() for p in net.parameters()) + sum(b.numel()
                                                                 for b in net.buffers())
        assert m["parameters"] == counted
        assert model_size(folder) == {"model_bytes": walked, "parameters": counted}
    small, big = models["small"]["speed"].metrics, models["big"]["speed"].metrics
    assert big["parameters"] > small["parameters"]
    assert big["model_bytes"] > small["model_bytes"]


def test_tags_round_trip(models):
    speed = models["big"]["speed"]
    tags = speed.tags()
    assert tags[TAG_PREFIX + "hardware"] == speed.hardware
    assert tags[TAG_PREFIX + "parameters"] == str(int(speed.metrics["parameters"]))
    back = speed_of({**tags, "other.tag": "x"})
    assert set(back) == set(speed.metrics)
    for key, value in speed.metrics.items():
        assert back[key] == pytest.approx(value, rel=1e-3), key
    assert speed_of({TAG_PREFIX + "hardware": "CPU"}) == {}
    assert Speed({"images_per_s_batch32": 1234.5678}, "h").tags()[
        TAG_PREFIX + "images_per_s_batch32"] == "1235"


def test_compare_line_says_which_way_and_by_how_much():
    fast = {"images_per_s_batch32": 800.0, "latency_p50_ms_batch1": 3.1,
            "model_bytes": 420_000.0, "parameters": 100_000.0}
    slow = {"images_per_s_batch32": 400.0, "latency_p50_ms_batch1": 5.0,
            "model_bytes": 44_700_000.0, "parameters": 11_200_000.0}
    line = compare_line(fast, slow)
    assert f"({800 / 400:.2f}x faster)" in line
    assert f"({44_700_000 / 420_000:.0f}x smaller)" in line  # 106x
    assert "800 images/s" in line and "400 images/s" in line
    assert "3.10 ms vs 5.00 ms" in line and "0.420 MB vs 44.7 MB" in line
    assert "0.100 M vs 11.2 M parameters" in line
    back = compare_line(slow, fast)
    assert f"({800 / 400:.2f}x slower)" in back and "106x larger" in back
    assert "(same)" in compare_line(fast, {**fast, "images_per_s_batch32": 804.0})
    assert compare_line(fast, {"latency_p50_ms_batch1": 1.0}) is None
    assert compare_line({}, slow) is None


def test_hardware_name_names_the_cores_and_the_gpu():
    name = hardware_name()
    assert f"{os.cpu_count()} cores" in name
    # no GPU on the machines the unit tests run on; on one with a GPU, the line says it is unused
    assert ("present, not used" if torch.cuda.is_available() else "no GPU") in name


def test_a_broken_model_is_refused_not_timed(models, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(models["small"]["dir"], broken)
    (broken / "artifacts" / WEIGHTS_FILE).write_bytes(b"not a torch.export program" * 100)
    start = time.perf_counter()
    with pytest.raises(Exception):
        measure_speed(broken, seconds_per_batch=0.1)
    assert time.perf_counter() - start < 30
    with pytest.raises(RuntimeError, match="did not classify"):
        measure_speed(models["small"]["dir"], images=[b"not an image"], seconds_per_batch=0.1)
