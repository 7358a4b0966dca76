"""Whether a saved training state is over: a run resumed from it must report, not train."""

from __future__ import annotations

import pytest

from components.training.loop import finished_metrics, track_best


def _run(f1s, patience, epochs):
    state = {"epoch": 0, "best_val_f1": -1.0, "best_val_loss": float("inf"), "best_epoch": 0,
             "epochs_without_gain": 0, "stopped_early": False}
    for epoch, f1 in enumerate(f1s, start=1):
        _, stop = track_best(state, epoch, f1, 1.0 - f1, patience)
        state["last_metrics"] = {"epoch": epoch, "val_f1": f1, "early_stopped": int(stop),
                                 "best_val_f1": state["best_val_f1"]}
        if stop:
            break
    return state


@pytest.mark.parametrize("f1s,patience,epochs,expected", [
    ([0.5, 0.6], 0, 3, None),                          # one epoch left: train on
    ([0.5, 0.6, 0.7], 0, 3, {"epoch": 3, "val_f1": 0.7}),     # all epochs done
    ([0.5, 0.4, 0.3], 2, 5, {"epoch": 3, "early_stopped": 1}),  # stopped by patience
    ([0.5, 0.4], 2, 5, None),                          # one epoch short of stopping
])
def test_finished_metrics_of_a_saved_state(f1s, patience, epochs, expected):
    state = _run(f1s, patience, epochs)
    got = finished_metrics(state, epochs)
    if expected is None:
        assert got is None
    else:
        assert got == state["last_metrics"]
        assert expected.items() <= got.items()
        assert got is not state["last_metrics"]  # a copy: reporting it leaves the state alone


def test_early_stop_is_recorded_in_the_state():
    # Before: a run resumed after an early stop trained on past it (state had no stop flag).
    state = _run([0.5, 0.4], 1, 10)
    assert state["stopped_early"] is True and state["epoch"] == 2
    assert finished_metrics(state, 10) is not None


def test_state_saved_without_last_metrics_reports_its_best_epoch():
    state = {"epoch": 4, "best_val_f1": 0.8, "best_val_loss": 0.3, "best_epoch": 2,
             "epochs_without_gain": 2}
    assert finished_metrics(state, 4) == {"epoch": 4, "best_val_f1": 0.8, "best_val_loss": 0.3,
                                          "best_epoch": 2, "early_stopped": 0}
    assert finished_metrics(state, 5) is None


def test_each_rank_gets_its_own_shard_of_train_and_val(tmp_path):
    """A rank never holds the whole split: its train rows are its fixed shard, its val rows
    are disjoint from the other rank's, and with a small cache limit nothing is kept."""
    from components.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
    from components.training.loaders import rank_datasets
    from components.training.spec import TrainJob

    paths = [f"/data/{i}.png" for i in range(101)]
    val = [f"/data/v{i}.png" for i in range(11)]
    job = TrainJob(data=DataConfig(image_size=128, channels=3, cache_max_mb=1),
                   augment=AugmentConfig(), model=ModelConfig(), train=TrainConfig(),
                   average="macro", seed=0,
                   train_rows=(paths, [i % 2 for i in range(101)]),
                   val_rows=(val, [i % 2 for i in range(11)]), num_classes=2)
    prep = {"mean": [0.5] * 3, "std": [0.5] * 3}
    (t0, v0), (t1, v1) = (rank_datasets(job, r, 2, prep) for r in (0, 1))
    assert len(t0) == len(t1) == 51
    assert set(t0.paths) | set(t1.paths) == set(paths)
    assert sorted(v0.ids + v1.ids) == list(range(11)) and not set(v0.paths) & set(v1.paths)
    assert t0._cache is None and v0._cache is None     # 51 x 48 KiB > 1 MiB: decode per epoch
    small = TrainJob(**{**job.__dict__, "data": DataConfig(image_size=8, channels=3)})
    assert rank_datasets(small, 0, 2, prep)[0]._cache == {}   # fits: kept after decoding


def _checkpoint(folder, epoch: int, torn: bool = False):
    import json

    import torch

    from components.training.checkpoint import BEST_MODEL_FILE, MODEL_FILE, STATE_FILE

    folder.mkdir(parents=True)
    torch.save({"w": torch.ones(3) * epoch}, folder / MODEL_FILE)
    torch.save({"w": torch.ones(3)}, folder / BEST_MODEL_FILE)
    (folder / STATE_FILE).write_text(json.dumps({"epoch": epoch}))
    if torn:   # the disk filled while the weights were written
        data = (folder / MODEL_FILE).read_bytes()
        (folder / MODEL_FILE).write_bytes(data[: len(data) // 2])


def test_a_torn_checkpoint_list_is_moved_aside_and_the_newest_intact_checkpoint_used(tmp_path):
    """Ray Train rewrites its checkpoint list in place; a full disk leaves it empty and Ray
    then fails the run at every restart. The run continues from what reads back."""
    from components.training.checkpoint import SNAPSHOT_FILE, recover_torn_run

    run = tmp_path / "vt_trial_0"
    _checkpoint(run / "checkpoint_2026-12-05_10-00-01.000001", epoch=3)
    _checkpoint(run / "checkpoint_2026-12-05_10-00-09.000001", epoch=4, torn=True)
    (run / SNAPSHOT_FILE).write_bytes(b"")
    torn, intact = recover_torn_run(str(tmp_path), "vt_trial_0")
    assert torn and intact == str(run / "checkpoint_2026-12-05_10-00-01.000001")
    assert not (run / SNAPSHOT_FILE).exists() and (run / (SNAPSHOT_FILE + ".torn")).exists()
    # next time the list is absent: Ray's own restore (nothing to do here)
    assert recover_torn_run(str(tmp_path), "vt_trial_0") == (False, None)


def test_an_intact_or_absent_checkpoint_list_is_left_to_ray(tmp_path):
    from components.training.checkpoint import SNAPSHOT_FILE, recover_torn_run

    assert recover_torn_run(str(tmp_path), "never_ran") == (False, None)
    run = tmp_path / "vt_trial_1"
    _checkpoint(run / "checkpoint_a", epoch=2)
    (run / SNAPSHOT_FILE).write_text('{"ray_version": "2.60.0"}')
    assert recover_torn_run(str(tmp_path), "vt_trial_1") == (False, None)
    assert (run / SNAPSHOT_FILE).exists()


def test_a_torn_list_without_an_intact_checkpoint_starts_over(tmp_path):
    from components.training.checkpoint import SNAPSHOT_FILE, recover_torn_run

    run = tmp_path / "vt_trial_2"
    _checkpoint(run / "checkpoint_a", epoch=1, torn=True)
    (run / SNAPSHOT_FILE).write_bytes(b'{"ray_ver')
    assert recover_torn_run(str(tmp_path), "vt_trial_2") == (True, None)
