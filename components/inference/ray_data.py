"""Classifying many images as a Ray Data job over the cluster (`visiontune predict --ray`):
the registered model's own `predict` (`components.inference.local`) in every actor, the rows
back in input order as they finish (written by `components.inference.output`).

The model is downloaded once by the driver and put in Ray's object store as one archive; a
pool of actors (one CPU each, by default as many as the cluster has CPUs) each unpacks and
loads it once, and `map_batches` sends them batches of image paths (local files the nodes can
read, or object-storage URIs). Every actor classifies with the same model version, even if an
alias moves while the job runs.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from components import storage
from components.inference.local import BATCH_SIZE, ERROR, PATH, PREDICTION, local_batches

SOURCE = "source"   # what an actor reads: an absolute path or a URI (actors run elsewhere)


def pack_model(model_dir: str | Path) -> bytes:
    """A downloaded MLflow model directory as one archive (what the actors unpack)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(model_dir), arcname="model")
    return buf.getvalue()


class _Classifier:
    """A Ray Data actor: unpacks and loads the model once, then classifies batches of paths.
    `model_box` is [ObjectRef of the archive], boxed so that Ray hands the reference over
    instead of resolving it on the way."""

    def __init__(self, model_box: list, batch_size: int):
        import tempfile

        import mlflow
        import ray

        from components.inference.formats import image_model

        self._dir = tempfile.mkdtemp(prefix="visiontune-model-")
        with tarfile.open(fileobj=io.BytesIO(ray.get(model_box[0]))) as tar:
            tar.extractall(self._dir, filter="data")
        self._model = image_model(mlflow.pyfunc.load_model(os.path.join(self._dir, "model")))
        self._batch_size = batch_size

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        sources = batch[SOURCE].astype(str).tolist()
        frames = list(local_batches(self._model, sources, self._batch_size))
        out = pd.concat(frames, ignore_index=True)
        out[PATH] = batch[PATH].astype(str).to_numpy()   # named as the user gave it
        # One Arrow type per column in every block: failed rows have None where floats go
        for col in out.columns[2:-1]:
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
        out[PREDICTION] = out[PREDICTION].fillna("").astype(str)
        out[ERROR] = out[ERROR].fillna("").astype(str)
        return out

    def __del__(self):
        import shutil

        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)


def default_workers() -> int:
    """One actor per CPU of the connected cluster."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def ray_batches(model_archive: bytes, paths: list[str], workers: int | None = None,
                batch_size: int = BATCH_SIZE) -> Iterator[pd.DataFrame]:
    """On the connected Ray cluster: `map_batches` over a pool of `workers` actors (1 CPU
    each). Blocks come back in input order as they finish. Close the generator before Ray
    shuts down (`contextlib.closing`)."""
    import ray
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True   # rows in input order, like the local engine
    ctx.enable_progress_bars = False              # our own progress line instead
    block = batch_size * 2
    num_blocks = max(1, math.ceil(len(paths) / block))
    workers = max(1, min(workers or default_workers(), num_blocks))
    model_box = [ray.put(model_archive)]
    # Actors do not run in this directory: they read absolute paths, the output keeps the
    # paths as given.
    items = [{PATH: p, SOURCE: p if storage.is_uri(p) else os.path.abspath(p)} for p in paths]
    ds = ray.data.from_items(items, override_num_blocks=num_blocks)
    ds = ds.map_batches(_Classifier, fn_constructor_kwargs={"model_box": model_box,
                                                           "batch_size": batch_size},
                        batch_size=block, batch_format="pandas", concurrency=workers,
                        num_cpus=1)
    # Closed here, while Ray is still up, also when the consumer stops early (a signal): a
    # Ray Data iterator finalised after ray.shutdown() reports to a stats actor that is gone,
    # and that call starts a new local Ray.
    with contextlib.closing(iter(ds.iter_batches(batch_size=None,
                                                 batch_format="pandas"))) as it:
        for frame in it:
            yield frame.reset_index(drop=True)
