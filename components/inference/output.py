"""`visiontune predict`'s output: CSV, or Parquet when the file name ends in `.parquet`;
columns `path`, `prediction`, `probability`. It grows in `<output>.partial` and is renamed to
`<output>` when every image is done, so a file under the final name is always whole; an
interrupted job leaves the partial file with the rows done so far. Without a file, CSV to
standard output.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from components.inference.local import ERROR, PATH, PREDICTION, PROBABILITY
from components.serving.image_classifier import is_missing

COLUMNS = [PATH, PREDICTION, PROBABILITY]
PARTIAL = ".partial"


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
