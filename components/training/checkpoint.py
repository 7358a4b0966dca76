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


def write_checkpoint(folder: str | Path, model_state: dict, optimizer, scheduler,
                     best_weights: dict | None, state: dict, prep: dict) -> None:
    """Rank 0's checkpoint: the resume state, the best weights and the preprocessing."""
    torch.save({"model": model_state, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler else None},
               Path(folder) / MODEL_FILE)
    torch.save(best_weights, Path(folder) / BEST_MODEL_FILE)
    (Path(folder) / STATE_FILE).write_text(json.dumps(state))
    (Path(folder) / PREPROCESSING_FILE).write_text(json.dumps(prep))


def restore_checkpoint(resumed: dict, model, optimizer, scheduler) -> tuple[dict, dict]:
    """A restarted run continues where it stopped: `resumed` (`read_checkpoint`) loaded into
    the model (unwrapped from DDP), the optimizer and the scheduler. Returns (the best
    weights, the run's state)."""
    saved = resumed["saved"]
    (model.module if hasattr(model, "module") else model).load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved.get("scheduler"):
        scheduler.load_state_dict(saved["scheduler"])
    return resumed["best"], resumed["state"]


def load_best_weights(checkpoint: str | Path) -> dict:
    """The best epoch's weights from a checkpoint directory: a local path or a URI on the
    run's storage (s3://..., read through the same filesystem Ray wrote it with)."""
    data = storage.read_bytes(storage.join(str(checkpoint), BEST_MODEL_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


# Ray Train 2.60 lists a run's checkpoints in this file, rewritten in place at every report.
SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"


def _intact(directory: str) -> bool:
    """The checkpoint's state and both weight files can be read back."""
    try:
        json.loads(storage.read_bytes(storage.join(directory, STATE_FILE)))
        for name in (MODEL_FILE, BEST_MODEL_FILE):
            torch.load(io.BytesIO(storage.read_bytes(storage.join(directory, name))),
                       map_location="cpu", weights_only=True)
    except Exception:   # a torn or missing file: any reader error means not intact
        return False
    return True


def recover_torn_run(storage_path: str, name: str) -> tuple[bool, str | None]:
    """(torn, latest intact checkpoint) of Train run `name` under `storage_path`.

    Ray rewrites its checkpoint list in place, so a full disk (or a process killed mid-write)
    can leave it empty; Ray then fails the run at every restart
    (CheckpointManagerInitializationError) and the trial can never finish. A torn list is
    moved aside (`.torn`, kept for a post-mortem) and the run's newest checkpoint whose files
    all read back is returned for the worker to continue from (None: start over). An intact or
    absent list returns (False, None): Ray restores as usual."""
    run_dir = storage.join(storage_path, name)
    snapshot = storage.join(run_dir, SNAPSHOT_FILE)
    if storage.file_type(snapshot) != "file":
        return False, None
    try:
        json.loads(storage.read_bytes(snapshot))
        return False, None
    except ValueError:
        pass
    fs, path = storage.resolve(snapshot)
    fs.move(path, path + ".torn")
    return True, newest_intact(run_dir)


def newest_intact(run_dir: str) -> str | None:
    """The newest `checkpoint_*` folder under `run_dir` (a Train run's or a Tune trial's)
    whose files all read back, named the way `run_dir` is; None when there is none."""
    import pyarrow.fs as pafs

    fs, run_path = storage.resolve(run_dir)
    dirs = sorted((i.base_name for i in fs.get_file_info(pafs.FileSelector(run_path))
                   if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")),
                  reverse=True)
    return next((storage.join(run_dir, d) for d in dirs if _intact(storage.join(run_dir, d))),
                None)
