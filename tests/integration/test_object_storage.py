"""Object storage for real: an S3-compatible server (moto) on 127.0.0.1, reached through the
standard AWS variables. Checkpoints under `ray.storage_path=s3://...`, images under
`data.path=s3://...`, and the storage layer's joins and reads."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from components import storage
from components.data import index_images, split_dataset, validate_images
from components.data.dataset import load_image
from components.training.checkpoint import BEST_MODEL_FILE, load_best_weights
from tests.conftest import make_image_folder

pytestmark = [pytest.mark.integration]

BIN = Path(sys.executable).parent


def test_uri_joins_reads_and_checkpoint_paths(s3_server):
    bucket = s3_server.bucket("vt-layer")
    base = f"s3://{bucket}/ray"
    # pathlib would make these s3:/vt-layer/...: the bug that failed every trial.
    assert storage.join(base, "exp", "train") == f"s3://{bucket}/ray/exp/train"
    assert storage.join(base + "/", "/a/") == f"s3://{bucket}/ray/a"
    assert (storage.join(f"{base}?endpoint_override=127.0.0.1:9", "x")
            == f"s3://{bucket}/ray/x?endpoint_override=127.0.0.1:9")
    assert storage.join("/tmp/r", "exp") == "/tmp/r/exp"
    # Ray reports checkpoint paths inside its filesystem, without the scheme.
    assert storage.uri_in(base, f"{bucket}/ray/exp/ckpt") == f"s3://{bucket}/ray/exp/ckpt"
    assert storage.uri_in("/tmp/r", "/tmp/r/ckpt") == "/tmp/r/ckpt"

    storage.check_writable(base)
    # The probe is removed (pyarrow may leave the folder marker `ray/`).
    assert [k for k in s3_server.keys(bucket) if not k.endswith("/")] == []

    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    buf = io.BytesIO()
    torch.save(weights, buf)
    s3_server.client().put_object(Bucket=bucket, Key=f"ray/exp/ckpt/{BEST_MODEL_FILE}",
                                  Body=buf.getvalue())
    loaded = load_best_weights(f"s3://{bucket}/ray/exp/ckpt")
    assert torch.equal(loaded["w"], weights["w"])
    assert storage.file_type(f"s3://{bucket}/ray/exp") == "dir"
    assert storage.file_type(f"s3://{bucket}/ray/nothing") == "missing"


def test_unwritable_storage_path_fails_once_with_one_line(s3_server, tmp_path):
    """A missing bucket is refused before any data is read or any trial starts."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run(
        [str(BIN / "visiontune"), "run", "search=quick", "train.epochs=1",
         "ray.storage_path=s3://no-such-bucket/ray"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("visiontune:")]
    assert len(lines) == 1 and "ray.storage_path=s3://no-such-bucket/ray is not writable" \
        in lines[0], proc.stderr
    # Refused while planning, before a run is opened: nothing is recorded at all.
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []


def test_image_folder_in_s3_indexes_validates_and_loads_like_a_local_one(s3_server, tmp_path):
    local = make_image_folder(tmp_path / "images")
    url = s3_server.upload_folder(local, s3_server.bucket("vt-data"), "datasets/pets")
    index, local_index = index_images(url), index_images(local)
    assert index.classes == local_index.classes and len(index) == len(local_index) == 43
    assert all(p.startswith(f"{url}/") for p in index.paths)
    checked, checked_local = validate_images(index), validate_images(local_index)
    assert len(checked.skipped) == 3 and len(checked.index) == 40
    # The same bytes: the same fingerprint, wherever the folder lives.
    assert (split_dataset(checked, .15, .15, 0).fingerprint
            == split_dataset(checked_local, .15, .15, 0).fingerprint)
    assert load_image(checked.index.paths[0], 3, 8).shape == (8, 8, 3)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        index_images(f"{url}-missing")


def test_csv_manifest_in_s3_with_relative_and_absolute_rows(s3_server, tmp_path):
    local = make_image_folder(tmp_path / "images", corrupt=False, per_class=4)
    bucket = s3_server.bucket("vt-csv")
    url = s3_server.upload_folder(local, bucket, "set")
    rows = ["path,label", "cat/000.png,cat", f"{url}/dog/000.png,dog", "dog/missing.png,dog"]
    s3_server.client().put_object(Bucket=bucket, Key="set/manifest.csv",
                                  Body="\n".join(rows).encode())
    index = index_images(f"{url}/manifest.csv")
    assert index.classes == ["cat", "dog"] and index.labels == [0, 1, 1]
    assert index.paths == [f"{url}/cat/000.png", f"{url}/dog/000.png", f"{url}/dog/missing.png"]
    checked = validate_images(index, min_per_class=1)
    assert [p for p, _ in checked.skipped] == [f"{url}/dog/missing.png"]   # missing: skipped


def test_storage_that_does_not_answer_stops_instead_of_skipping_images(s3_server, tmp_path):
    """A refused connection is not a bad image: skipping it would change the data quietly."""
    from components.data.ingest import ImageIndex
    from components.storage import StorageError

    down = "s3://vt-any/img.png?endpoint_override=127.0.0.1:1&scheme=http"
    index = ImageIndex("s3://vt-any", [down] * 3, [0, 1, 1], ["a", "b"])
    with pytest.raises(StorageError, match="reading s3://vt-any/img.png"):
        validate_images(index, min_per_class=1)


def test_credentials_in_a_storage_uri_are_refused(s3_server):
    from components.storage import StorageError

    with pytest.raises(StorageError, match="credentials in the URI \\(secret_key\\)"):
        storage.check_writable("s3://vt-layer/ray?secret_key=abc")


@pytest.mark.slow
def test_pipeline_with_data_and_checkpoints_in_s3(s3_server, local_ray, tmp_path, monkeypatch):
    from pipelines.compose import load_config

    monkeypatch.chdir(tmp_path)  # where a local default storage path would appear
    from pipelines.training import run_training_pipeline

    bucket = s3_server.bucket("vt-pipeline")
    data = s3_server.upload_folder(make_image_folder(tmp_path / "images", per_class=24),
                                   bucket, "images")
    cfg = load_config([
        f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
        "search=quick", "train.epochs=2", "train.num_workers=2", "train.batch_size=8",
        "train.patience=0", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        f"tracking.artifact_location={tmp_path}/mlruns",
        f"ray.storage_path=s3://{bucket}/ray", "registry.model_name=s3-model",
        "model.cnn.channels=[8,16]"])
    result = run_training_pipeline(cfg)

    client = MlflowClient(cfg.tracking.uri)
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"
    assert client.get_model_version("s3-model", result.registered_version).status == "READY"
    keys = s3_server.keys(bucket, f"ray/{result.pipeline_id}/")
    best = [k for k in keys if k.endswith(f"/{BEST_MODEL_FILE}")]
    assert len(best) == 2, keys  # one kept checkpoint per trial, both in the bucket
    board = pd.read_csv(client.download_artifacts(result.parent_run_id,
                                                  "evaluation/leaderboard.csv", str(tmp_path)))
    assert all(c.startswith(f"s3://{bucket}/ray/{result.pipeline_id}/train/")
               for c in board["checkpoint"])
    # Evaluation read the chosen checkpoint back from the bucket: the registered model is
    # the best trial's best epoch, whose test predictions were logged.
    preds = pd.read_csv(client.download_artifacts(
        result.parent_run_id, "evaluation/test_predictions.csv", str(tmp_path)))
    assert preds["path"].str.startswith(f"{data}/").all()
    assert not (tmp_path / "ray_results").exists()
