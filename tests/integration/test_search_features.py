"""ASHA early stopping, and k-fold CV of a fine-tuned pretrained backbone with gradual
unfreezing under DDP: local Ray with 2 CPUs, SQLite MLflow in a temp dir."""

from __future__ import annotations

import pytest
import torch
import torchvision
from mlflow import MlflowClient

from pipelines.compose import load_config
from pipelines.training import run_training_pipeline
from tests.conftest import make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _common(tmp, data):
    return [f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"ray.storage_path={tmp}/ray_results",
            "train.patience=0", "train.batch_size=8"]


def _children(client, result):
    exp = client.get_run(result.parent_run_id).info.experiment_id
    return client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")


def test_asha_stops_weak_trials_and_mlflow_records_them_killed(tmp_path, local_ray):
    data = make_image_folder(tmp_path / "images", per_class=40, corrupt=False)
    epochs = 4
    cfg = load_config(_common(tmp_path, data) + [
        "search.mode=grid", "search.budget=null", "search.scheduler=asha",
        "search.grace_period=1",
        "search.reduction_factor=2", f"train.epochs={epochs}",  # the plan: trials in-process
        "train.optimizer=sgd_momentum", "model.cnn.channels=[8,16]",
        # two trials that learn at once, two that cannot learn at all (lr ~ 0)
        "search.space={train.lr: {grid: [0.1, 0.05, 1.0e-9, 1.0e-10]}}",
    ])
    result = run_training_pipeline(cfg)
    client = MlflowClient(cfg.tracking.uri)
    children = _children(client, result)
    assert len(children) == 4
    killed = [c for c in children if c.info.status == "KILLED"]
    assert killed, [(c.data.params, c.info.status) for c in children]
    for child in children:
        assert child.info.status in ("FINISHED", "KILLED")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_f1")]
        assert steps == list(range(1, len(steps) + 1))
        if child.info.status == "KILLED":
            assert len(steps) < epochs  # the epochs it ran, no more
        else:
            assert len(steps) == epochs
    parent = client.get_run(result.parent_run_id)
    assert parent.data.metrics["trials_killed"] == len(killed)
    assert parent.data.tags["visiontune.plan.in_trial"] == "True"  # stopped at a report by Tune


def test_cv_of_pretrained_backbone_with_gradual_unfreezing(tmp_path, local_ray):
    data = make_image_folder(tmp_path / "images", per_class=20, corrupt=False)
    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    cfg = load_config(_common(tmp_path, data) + [
        "model=resnet18", "model.pretrained=true", f"model.weights_path={weights}",
        "model.freeze=backbone", "model.unfreeze_epoch=2", "model.backbone_lr_mult=0.1",
        "data.cv_folds=2", "train.epochs=2", "train.num_workers=2", "train.optimizer=adamw",
        "search.mode=grid", "search.budget=null", "search.space={}", "data.channels=3",
    ])
    result = run_training_pipeline(cfg)
    client = MlflowClient(cfg.tracking.uri)
    (child,) = _children(client, result)
    assert child.info.status == "FINISHED"
    run_id = child.info.run_id
    for fold in (0, 1):
        history = client.get_metric_history(run_id, f"fold{fold}/val_f1")
        assert [m.step for m in history] == [1, 2]
    metrics = client.get_run(run_id).data.metrics
    folds = [metrics["fold0/best_val_f1"], metrics["fold1/best_val_f1"]]
    assert metrics["cv_mean_val_f1"] == pytest.approx(sum(folds) / 2)
    assert result.best_val_f1 == pytest.approx(sum(folds) / 2)
    # once per pipeline, on the parent run (the augmentation is not searched here)
    assert "augmented_samples.png" in {a.path for a in
                                       client.list_artifacts(result.parent_run_id)}
    assert "augmented_samples.png" not in {a.path for a in client.list_artifacts(run_id)}
    assert 0 <= result.test_metrics["test_f1"] <= 1
    # what is registered is said exactly: one fold's model, chosen by the folds' mean
    mv = client.get_model_version(result.registered_name, result.registered_version)
    assert float(mv.tags["val_f1"]) == pytest.approx(max(folds))
    assert float(mv.tags["cv_mean_val_f1"]) == pytest.approx(sum(folds) / 2)
    assert "**What is registered (k-fold CV)**" in mv.description
    assert any(f"the model is fold {f}'s" in mv.description for f in (0, 1)
               if folds[f] == max(folds))
