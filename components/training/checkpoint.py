"""A training run's checkpoint: what it holds and how it is read back.

A checkpoint directory holds `model.pt` (the weights, the optimizer's and the LR scheduler's
state: what a resumed run continues from), `best_model.pt` (the best epoch's weights so far:
what evaluation and registration use), `state.json` (epochs done, the best epoch, patience)
and `preprocessing.json` (the eval preprocessing the weights were trained with)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from components import storage

MODEL_FILE, BEST_MODEL_FILE, STATE_FILE = "model.pt", "best_model.pt", "state.json"
PREPROCESSING_FILE = "preprocessing.json"


def read_checkpoint(checkpoint) -> dict:
    """A Ray checkpoint's resume state: {"saved": model.pt, "best": best weights, "state"}."""
    with checkpoint.as_directory() as d:
        return {"saved": torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True),
                "best": torch.load(Path(d) / BEST_MODEL_FILE, map_location="cpu",
                                   weights_only=True),
                "state": json.loads((Path(d) / STATE_FILE).read_text())}


def load_best_weights(checkpoint: str | Path) -> dict:
    """The best epoch's weights from a checkpoint directory: a local path or a URI on the
    run's storage (s3://..., read through the same filesystem Ray wrote it with)."""
    data = storage.read_bytes(storage.join(str(checkpoint), BEST_MODEL_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
