"""Tune's saved state of a sweep that names a checkpoint Tune deleted since: a real (tiny)
Tune experiment on a local Ray, then the state left as a driver killed between Tune's deletion
of a trial's older checkpoint and its next save of the sweep leaves it (seen in CI after a
SIGKILL of the driver: every restore of that trial then failed)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import ray
import torch
from ray import tune

from components.training.checkpoint import (
    BEST_MODEL_FILE,
    MODEL_FILE,
    STATE_FILE,
    load_best_weights,
)
from components.tuning.sweep_state import put_back_deleted_checkpoints

pytestmark = pytest.mark.slow


def _trainable(config):
    for epoch in range(1, 4):
        with tempfile.TemporaryDirectory() as d:
            torch.save({"model": {"w": torch.tensor([float(epoch)])}}, Path(d) / MODEL_FILE)
            torch.save({"w": torch.tensor([float(epoch)])}, Path(d) / BEST_MODEL_FILE)
            (Path(d) / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
            tune.report({"epoch": epoch}, checkpoint=tune.Checkpoint.from_directory(d))


@pytest.fixture
def finished_sweep(tmp_path):
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tune.Tuner(_trainable, run_config=tune.RunConfig(
            name="sweep", storage_path=str(tmp_path), verbose=0,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1))).fit()
    finally:
        ray.shutdown()
    return tmp_path / "sweep"


def test_a_checkpoint_deleted_after_tune_last_saved_is_put_back_from_the_newest(finished_sweep):
    [trial] = [p for p in finished_sweep.iterdir() if p.is_dir()]
    [named] = sorted(trial.glob("checkpoint_*"))        # the one the saved state names
    assert json.loads((named / STATE_FILE).read_text()) == {"epoch": 3}
    # Tune wrote the next one and deleted this one; the driver died before it saved again
    newer = named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}")
    named.rename(newer)
    (newer / STATE_FILE).write_text(json.dumps({"epoch": 4}))

    assert put_back_deleted_checkpoints(str(finished_sweep)) == [str(named)]
    assert json.loads((named / STATE_FILE).read_text()) == {"epoch": 4}
    assert load_best_weights(named)["w"].item() == 3.0
    assert newer.is_dir()
    assert put_back_deleted_checkpoints(str(finished_sweep)) == []   # nothing left to do


def test_nothing_is_put_back_without_an_intact_checkpoint_to_copy(finished_sweep):
    [trial] = [p for p in finished_sweep.iterdir() if p.is_dir()]
    [named] = sorted(trial.glob("checkpoint_*"))
    torn = named.with_name(f"checkpoint_{int(named.name.split('_')[1]) + 1:06d}")
    named.rename(torn)
    (torn / BEST_MODEL_FILE).write_bytes(b"")           # cut off by a full disk
    assert put_back_deleted_checkpoints(str(finished_sweep)) == []
    assert not named.exists()
    shutil.rmtree(torn)
    assert put_back_deleted_checkpoints(str(finished_sweep)) == []
