"""The Ray Train worker under real DDP (2 gloo workers on CPU, local Ray):

- the model validated each epoch is the model checkpointed (BatchNorm statistics included);
- a Train run resumed after it had ended reports its final metrics again without training,
  so a trial re-run by a resumed sweep still gives Tune a result.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from components.augment import build_eval_transform, eval_preprocessing
from components.config import AugmentConfig, CnnConfig, DataConfig, ModelConfig, TrainConfig
from components.data.dataset import ImageDataset
from components.data.ingest import index_images
from components.data.split import split_dataset
from components.data.validate import validate_images
from components.models import build_model
from components.training.checkpoint import BEST_MODEL_FILE, MODEL_FILE
from components.training.ranks import evaluate_split
from components.training.spec import TrainJob
from components.training.trainer import build_trainer
from tests.conftest import make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NAME = "ddp-run"


@pytest.fixture(scope="module", autouse=True)
def _fast_reports():
    # Set before `local_ray` starts Ray (autouse fixtures of a scope come first): Train V2
    # collects worker reports once per health-check interval, 2 s by default.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
        yield


@dataclass
class FinishedRun:
    job: TrainJob
    storage_path: str
    result: object          # ray.train.Result of the first fit
    checkpoint_copy: Path   # its last checkpoint, copied before any later fit replaces it
    fit_s: float


def _job(root: Path) -> TrainJob:
    images = validate_images(index_images(root))
    manifest = split_dataset(images, 0.3, 0.15, seed=0)
    data = DataConfig(path=str(root), image_size=16, channels=3)
    return TrainJob(
        data=data, augment=AugmentConfig(train=[]),
        model=ModelConfig(cnn=CnnConfig(channels=[8, 16])),
        # A high lr moves BatchNorm's batch statistics far between batches, so ranks that
        # kept their own last-batch running statistics would validate visibly different models.
        train=TrainConfig(epochs=2, batch_size=8, patience=0, num_workers=2, lr=0.01,
                          scheduler="none", max_failures=0),
        average="macro", seed=0, train_rows=manifest.subset("train"),
        val_rows=manifest.subset("val"), num_classes=len(manifest.classes))


@pytest.fixture(scope="module")
def finished_run(local_ray, tmp_path_factory) -> FinishedRun:
    tmp = tmp_path_factory.mktemp("ddp")
    job = _job(make_image_folder(tmp / "images", per_class=40, corrupt=False))
    assert job.model.cnn.batch_norm
    storage = str(tmp / "ray_results")
    start = time.monotonic()
    result = build_trainer(job, name=NAME, storage_path=storage).fit()
    fit_s = time.monotonic() - start
    assert result.error is None, result.error
    copy = tmp / "checkpoint_copy"
    shutil.copytree(result.checkpoint.path, copy)
    return FinishedRun(job, storage, result, copy, fit_s)


def _evaluate_in_one_process(job: TrainJob, weights: dict) -> dict[str, float]:
    """The whole val split through one unwrapped model, as evaluation would see it."""
    model = build_model(job.model, job.num_classes, job.data.channels)
    model.load_state_dict(weights)
    prep = eval_preprocessing(job.data, job.model)
    val = ImageDataset(*job.val_rows, job.data.channels, job.data.image_size,
                       build_eval_transform(job.data.channels, prep["mean"], prep["std"]))
    return evaluate_split(model, DataLoader(val, batch_size=64), torch.device("cpu"),
                          job.num_classes, job.average)


def test_validated_model_is_the_checkpointed_model(finished_run):
    run = finished_run
    reported = run.result.metrics
    assert reported["epoch"] == 2

    saved = torch.load(run.checkpoint_copy / MODEL_FILE, map_location="cpu", weights_only=True)
    assert any(k.endswith("running_mean") for k in saved["model"])  # BatchNorm is in play
    here = _evaluate_in_one_process(run.job, saved["model"])
    # Equal to the last bit here; without the buffer sync the ranks' own BatchNorm statistics
    # put the reported val_loss 8e-5 off (0.025706 reported, 0.025623 recomputed).
    assert here["loss"] == pytest.approx(reported["val_loss"], abs=1e-6)
    assert here["f1"] == pytest.approx(reported["val_f1"], abs=1e-9)
    assert here["accuracy"] == pytest.approx(reported["val_accuracy"], abs=1e-9)

    # The weights that evaluation and registration load reproduce the F1 that selected them.
    best = torch.load(run.checkpoint_copy / BEST_MODEL_FILE, map_location="cpu",
                      weights_only=True)
    here = _evaluate_in_one_process(run.job, best)
    assert here["f1"] == pytest.approx(reported["best_val_f1"], abs=1e-9)
    assert here["loss"] == pytest.approx(reported["best_val_loss"], abs=1e-6)


def _trial(config, job: TrainJob, storage_path: str, out: str):
    """A Tune trial as components.tuning.driver runs it: fit the trial's Train run by name."""
    from ray.tune.integration.ray_train import TuneReportCallback

    result = build_trainer(job, name=NAME, storage_path=storage_path,
                           callbacks=[TuneReportCallback()]).fit()
    Path(out).write_text(json.dumps({
        "metrics": result.metrics, "error": repr(result.error),
        "checkpoint": result.checkpoint.path if result.checkpoint else None}))


def test_resumed_run_that_had_ended_reports_without_training(finished_run, tmp_path):
    from ray import tune

    from components.tuning.plan import TRIAL_RESOURCES

    run = finished_run
    first = run.result.metrics
    out = tmp_path / "train_result.json"
    # The sweep is resumed after its driver died between the trial's last checkpoint and Tune
    # recording the trial: Tune runs the trial again, the Train run resumes from that
    # checkpoint, and Tune must still receive the trial's final result.
    trainable = tune.with_resources(
        tune.with_parameters(_trial, job=run.job, storage_path=run.storage_path, out=str(out)),
        dict(TRIAL_RESOURCES))
    start = time.monotonic()
    grid = tune.Tuner(trainable, run_config=tune.RunConfig(
        name="resumed", storage_path=str(tmp_path / "tune"), verbose=0)).fit()
    resumed_s = time.monotonic() - start

    (trial,) = list(grid)
    assert trial.error is None, trial.error
    # Tune got exactly one report: the final epoch's, identical to the first run's (no epoch
    # was trained again), with the checkpoint it points at.
    df = trial.metrics_dataframe
    assert df is not None and len(df) == 1, df
    for key in ("epoch", "val_loss", "val_f1", "best_val_f1", "best_val_loss", "best_epoch",
                "train_loss", "early_stopped"):
        assert trial.metrics[key] == first[key], key
    tune_ckpt = Path(trial.metrics["checkpoint_path"])
    assert (tune_ckpt / MODEL_FILE).is_file() and (tune_ckpt / BEST_MODEL_FILE).is_file()
    before = torch.load(run.checkpoint_copy / MODEL_FILE, weights_only=True)["model"]
    after = torch.load(tune_ckpt / MODEL_FILE, weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)

    # The Train run's own Result: metrics and a checkpoint (the one Tune was given).
    train = json.loads(out.read_text())
    assert train["error"] == "None"
    assert train["metrics"]["epoch"] == 2
    assert train["metrics"]["best_val_f1"] == first["best_val_f1"]
    assert Path(train["checkpoint"]) == tune_ckpt
    # One checkpoint kept (num_to_keep=1): the re-reported copy replaced the old directory.
    kept = [p.name for p in (Path(run.storage_path) / NAME).glob("checkpoint_*") if p.is_dir()]
    assert kept == [tune_ckpt.name]
    print(f"first fit {run.fit_s:.1f} s, resumed trial {resumed_s:.1f} s")
