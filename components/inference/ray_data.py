"""Classifying many images (`visiontune predict`): in this process, or as a Ray Data job over
the cluster. Either way it is the registered model's own `predict` (components.inference), the
rows come back in input order, and they are written as they come.

The Ray engine: the model is downloaded once by the driver and put in Ray's object store as
one archive; a pool of actors (one CPU each, by default as many as the cluster has CPUs) each
unpacks and loads it once, and `map_batches` sends them batches of image paths (local files the
nodes can read, or object-storage URIs). Every actor classifies with the same model version,
even if an alias moves while the job runs.

Output: CSV, or Parquet when the file name ends in `.parquet`; columns `path`, `prediction`,
`probability`. It grows in `<output>.partial` and is renamed to `<output>` when every image is
done, so a file under the final name is always whole; an interrupted job leaves the partial
file with the rows done so far.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from components import storage
from components.inference import ERROR, PREDICTION, PROBABILITY, predict_batches
from components.serving.image_classifier import is_missing

PATH = "path"
SOURCE = "source"   # what an actor reads: an absolute path or a URI (actors run elsewhere)
COLUMNS = [PATH, PREDICTION, PROBABILITY]
PARTIAL = ".partial"
BATCH_SIZE = 64


# ------------------------------------------------------------------------------- output
class PredictionWriter:
    """Rows to a CSV (or Parquet) file as they come, or CSV to `stream` when `output` is None."""

    def __init__(self, output: str | None, stream=None):
        self.output = output
        self.rows = 0
        self._parquet = None
        if output is None:
            self._file, self._partial = stream or sys.stdout, None
        else:
            self._partial = Path(output + PARTIAL)
            self._partial.parent.mkdir(parents=True, exist_ok=True)
            self._file = None if self.is_parquet else open(self._partial, "w", newline="")
        self._header = False

    @property
    def is_parquet(self) -> bool:
        return self.output is not None and self.output.lower().endswith(".parquet")

    @property
    def partial(self) -> Path | None:
        return self._partial

    def write(self, frame: pd.DataFrame) -> None:
        """`frame`: rows that were classified (`path`, `prediction`, `probability`, ...)."""
        frame = frame[COLUMNS].astype({PATH: str, PREDICTION: str, PROBABILITY: float})
        if self.is_parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(str(self._partial), table.schema)
            self._parquet.write_table(table)
        else:
            frame.to_csv(self._file, header=not self._header, index=False,
                         float_format="%.6f")
            self._file.flush()
        self._header = True
        self.rows += len(frame)

    def close(self, complete: bool) -> None:
        """Finish the file; rename it to its final name only when `complete`."""
        if not self._header:
            self.write(pd.DataFrame({c: pd.Series(dtype=object if c != PROBABILITY else float)
                                     for c in COLUMNS}))
        if self._parquet is not None:
            self._parquet.close()
        elif self._partial is not None:
            self._file.close()
        if complete and self._partial is not None:
            os.replace(self._partial, self.output)


def consume(batches: Iterator[pd.DataFrame], writer: PredictionWriter, progress,
            on_skipped) -> int:
    """Write each batch's classified rows; `on_skipped(path, reason)` for the others, and
    `progress.update(classified, unreadable)` after each batch. Returns the number of images
    classified."""
    classified = 0
    for frame in batches:
        bad = ~frame[ERROR].map(is_missing).to_numpy(bool)
        for path, reason in zip(frame[PATH][bad], frame[ERROR][bad]):
            on_skipped(str(path), str(reason))
        good = frame[~bad]
        if len(good):
            writer.write(good)
        classified += len(good)
        progress.update(len(good), int(bad.sum()))
    return classified


# ------------------------------------------------------------------------------- engines
def local_batches(model, paths: list[str], batch_size: int = BATCH_SIZE
                  ) -> Iterator[pd.DataFrame]:
    """In this process: the model's answer with a `path` column in front."""
    for i, frame in enumerate(predict_batches(model, paths, batch_size)):
        frame.insert(0, PATH, paths[i * batch_size: i * batch_size + len(frame)])
        yield frame


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

        from components.inference import image_model

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
