"""Decode once per sweep, through the CLI as a user runs it from one folder: the first run
decodes every image into a store, its trials and its evaluation decode nothing; a second run
over the same files reuses the store (and says so); one changed image builds a new one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from tests.conftest import cli_env, make_image_folder

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(tmp: Path, data: Path) -> str:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "visiontune"), "run", f"data.path={data}",
         "data=folder", "data.image_size=16", "augment=none", "search=quick",
         "train.epochs=1", "train.batch_size=8", "model.cnn.channels=[8,16]",
         "ray.num_cpus=2", "registry.model_name=decoded-once"],
        cwd=tmp, env=cli_env(), capture_output=True, text=True, timeout=600,
        start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _runs(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    exp = client.get_experiment_by_name("visiontune").experiment_id
    return client, client.search_runs([exp], "tags.`visiontune.role` = 'pipeline'",
                                      order_by=["attributes.start_time ASC"])


def test_a_sweep_decodes_each_image_once_and_a_later_run_reuses_it(tmp_path):
    data = make_image_folder(tmp_path / "images", per_class=20, corrupt=False)
    count = sum(1 for _ in data.rglob("*.*"))
    first = _run(tmp_path, data)
    assert f"decoded {count} images at 16 px" in first
    second = _run(tmp_path, data)
    assert "reusing the decoded images of an earlier run" in second
    assert "nothing decoded" in second
    photo = next(data.glob("cat/*.png"))
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(photo)   # one image changed
    third = _run(tmp_path, data)
    assert f"decoded {count} images at 16 px" in third

    client, parents = _runs(tmp_path)
    assert [p.data.metrics["data_decoded_images"] for p in parents] == [count, 0, count]
    stores = [p.data.tags["visiontune.decoded_images"] for p in parents]
    assert stores[0] == stores[1] != stores[2]
    assert all(Path(s, "index.json").is_file() for s in stores)
    for parent in parents:
        trials = client.search_runs([parent.info.experiment_id],
                                    f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(trials) == 2
        # every trial read its rows from the store: no file decoded in a trial
        assert [t.data.metrics["images_decoded"] for t in trials] == [0, 0]
