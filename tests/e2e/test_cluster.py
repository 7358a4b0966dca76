"""End to end against real servers, all on 127.0.0.1: a stock two-node Ray cluster (`ray start
--head` with no custom resources, and a second node joined with `ray start --address`), an
`mlflow server` (SQLite backend, served artifacts) and an S3-compatible server (moto) holding
the checkpoints, as object storage every node sees. The pipeline goes in through `visiontune
submit --follow`; promote, rollback and predict run through the CLI. Every process started here
is stopped, also when a test fails."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import MLFLOW_SERVER_ENV, free_port, make_image_folder, stop_ray_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

BIN = Path(sys.executable).parent
MODEL = "e2e-model"


def _wait_http(url: str, timeout: float) -> None:
    """Until the server answers at all (the dashboard answers 401 without the token)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


@pytest.fixture(scope="module")
def servers(tmp_path_factory, s3_server):
    tmp = tmp_path_factory.mktemp("e2e")
    # The job's `python`/`visiontune` come from the PATH of the shell that started the head;
    # every node reaches the S3 server through the AWS variables of the shell that started it.
    env = {**os.environ, **s3_server.env,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    env.pop("RAY_ADDRESS", None)
    gcs, dash, mlflow_port = free_port(), free_port(), free_port()
    # Each node's own temp dir (short: socket paths), so that teardown stops exactly these
    # nodes and no other Ray on the machine.
    head_tmp = tempfile.mkdtemp(prefix="vt-head-", dir="/tmp")
    node2_tmp = tempfile.mkdtemp(prefix="vt-node2-", dir="/tmp")
    mlflow_proc = None
    try:
        subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
             f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
             f"--dashboard-port={dash}", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={head_tmp}"],
            env=env, check=True, capture_output=True, text=True, timeout=120)
        # A second node, as a cluster's worker node joins: the head's address, and the
        # cluster's token (Ray 2.60's token auth; the token file is shared on one machine).
        # Its own temp dir, as on a machine of its own: two nodes sharing /tmp/ray would
        # garbage-collect each other's job working_dir (the job's cwd vanishes).
        subprocess.run(
            [str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}",
             "--node-ip-address=127.0.0.1", "--num-cpus=2", "--disable-usage-stats",
             f"--temp-dir={node2_tmp}"],
            env={**env, "RAY_AUTH_MODE": "token"}, check=True, capture_output=True, text=True,
            timeout=120)
        # Own process group: mlflow server forks web workers that must go down with it.
        mlflow_proc = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port),
             "--backend-store-uri", f"sqlite:///{tmp}/mlflow-server.db",
             "--artifacts-destination", str(tmp / "artifacts"), "--serve-artifacts",
             "--workers", "1"],
            env={**env, **MLFLOW_SERVER_ENV}, start_new_session=True,
            stdout=open(tmp / "mlflow.log", "w"),
            stderr=subprocess.STDOUT)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", 90)
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 60)
        yield {"tmp": tmp, "env": env, "dashboard": f"http://127.0.0.1:{dash}",
               "gcs": f"127.0.0.1:{gcs}",
               "tracking": f"http://127.0.0.1:{mlflow_port}", "s3": s3_server,
               "bucket": s3_server.bucket("vt-e2e")}
    finally:
        if mlflow_proc is not None:
            try:
                os.killpg(mlflow_proc.pid, signal.SIGTERM)
                mlflow_proc.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(mlflow_proc.pid, signal.SIGKILL)
        stop_ray_nodes([head_tmp, node2_tmp], gcs)
        shutil.rmtree(head_tmp, ignore_errors=True)
        shutil.rmtree(node2_tmp, ignore_errors=True)


def _cli(servers, *args, timeout=900):
    return subprocess.run([str(BIN / "visiontune"), *args], env=servers["env"],
                          capture_output=True, text=True, timeout=timeout,
                          cwd=servers["tmp"])


@pytest.fixture(scope="module")
def submitted(servers):
    data = make_image_folder(servers["tmp"] / "images", per_class=24)
    common = [f"data.path={data}", "data=folder", "data.image_size=16", "augment=none",
              "search=quick", "train.epochs=2", "train.batch_size=8",
              "train.patience=0", f"tracking.uri={servers['tracking']}",
              f"registry.model_name={MODEL}", f"ray.storage_path=s3://{servers['bucket']}/ray",
              "model.cnn.channels=[8,16]"]
    # The first run trains each trial data-parallel (2 DDP workers, a Ray Train worker
    # group); the second with the planner's choice (each trial in its own Tune process).
    first = _cli(servers, "submit", "--address", servers["dashboard"], "--follow", *common,
                 "train.num_workers=2")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    # A second run on the same images, read from the bucket, that cannot learn: it must not
    # take the champion.
    in_bucket = servers["s3"].upload_folder(data, servers["bucket"], "images")
    worse = _cli(servers, "submit", "--address", servers["dashboard"], "--follow", *common,
                 f"data.path={in_bucket}", "train.lr=1.0e-9", "train.epochs=1")
    assert worse.returncode == 0, worse.stdout[-3000:] + worse.stderr[-3000:]
    return {"data": data, "first": first.stdout, "worse": worse.stdout}


def test_submit_prints_job_and_records_run_tree_on_the_server(servers, submitted):
    assert "submitted job visiontune-" in submitted["first"]
    assert f"{servers['dashboard']}/#/jobs/visiontune-" in submitted["first"]
    client = MlflowClient(servers["tracking"])
    exp = client.get_experiment_by_name("visiontune")
    parents = client.search_runs([exp.experiment_id], "tags.`visiontune.role` = 'pipeline'",
                                 order_by=["attributes.start_time ASC"])
    assert len(parents) == 2
    for parent in parents:
        assert parent.info.status == "FINISHED"
        assert parent.data.tags["visiontune.ray_job_id"].startswith("visiontune-")
        assert parent.data.tags["visiontune.ray_cluster_address"] == servers["dashboard"]
        children = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        # Two trials at once on two 2-CPU nodes, one per node: 2 DDP workers each, or (the
        # plan's choice) each in its own process with 2 CPUs as torch threads.
        assert len({c.data.tags["visiontune.node_id"] for c in children}) == 2
        pipeline_id = parent.data.tags["visiontune.pipeline_id"]
        keys = servers["s3"].keys(servers["bucket"], f"ray/{pipeline_id}/")
        assert len([k for k in keys if k.endswith("/best_model.pt")]) == 2, keys
    assert [p.data.tags["visiontune.plan.in_trial"] for p in parents] == ["False", "True"]
    # Decoded once, in the bucket (by Ray tasks on the cluster), and read by the trials on
    # both nodes: no trial decoded a file.
    from components.data.ingest import index_images

    # every indexed file once, but the empty one (refused as it is read)
    attempted = len(index_images(str(submitted["data"]))) - 1
    for parent in parents:
        store = parent.data.tags["visiontune.decoded_images"]
        assert store.startswith(f"s3://{servers['bucket']}/ray/preprocessed/"), store
        prefix = store.removeprefix(f"s3://{servers['bucket']}/")
        assert sorted(k.rsplit("/", 1)[-1] for k in servers["s3"].keys(
            servers["bucket"], prefix)) == ["images.npy", "index.json"]
        assert parent.data.metrics["data_decoded_images"] == attempted
        children = client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
        assert [c.data.metrics["images_decoded"] for c in children] == [0, 0]
    assert "2 CPU" in parents[1].data.tags["visiontune.plan.reason"]
    # artifacts are served by the tracking server, not a shared disk; checkpoints are in S3
    assert exp.artifact_location.startswith("mlflow-artifacts:")
    jobs = _cli(servers, "jobs", "--address", servers["dashboard"])
    assert jobs.returncode == 0 and jobs.stdout.count("SUCCEEDED") == 2
    job_id = parents[0].data.tags["visiontune.ray_job_id"]
    status = _cli(servers, "status", job_id, "--address", servers["dashboard"], "--logs")
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(f"{job_id}  SUCCEEDED") and "finished in" in status.stdout
    unknown = _cli(servers, "status", "visiontune-nope", "--address", servers["dashboard"])
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert unknown.stderr.strip() == (f"visiontune: error: no such job at "
                                      f"{servers['dashboard']}: visiontune-nope")


def test_registry_promote_rollback_and_predict(servers, submitted, tmp_path):
    client = MlflowClient(servers["tracking"])
    champion = client.get_model_version_by_alias(MODEL, "champion")
    challenger = client.get_model_version_by_alias(MODEL, "challenger")
    assert (str(champion.version), str(challenger.version)) == ("1", "2")
    assert float(challenger.tags["test_f1"]) < float(champion.tags["test_f1"])

    # 48 images leave a handful in the test split: below registry.min_images (30), promote
    # would ask for more images instead of deciding (that rule is tested in test_promote.py)
    tracking = [f"tracking.uri={servers['tracking']}", "registry.min_images=1"]
    refused = _cli(servers, "promote", "--model", MODEL, *tracking)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "keep the champion" in refused.stdout
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    forced = _cli(servers, "promote", "--model", MODEL, "--force", *tracking)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "2"
    assert str(client.get_model_version_by_alias(MODEL, "previous-champion").version) == "1"

    back = _cli(servers, "rollback", "--model", MODEL, tracking[0])
    assert back.returncode == 0, back.stdout + back.stderr
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == "1"

    # predict with the champion reproduces its run's test predictions
    run_id = client.get_model_version(MODEL, "1").run_id
    expected = pd.read_csv(client.download_artifacts(run_id, "evaluation/test_predictions.csv",
                                                     str(tmp_path)))
    out = tmp_path / "predictions.csv"
    pred = _cli(servers, "predict", "--model", f"models:/{MODEL}@champion",
                *expected.path.tolist(), "-o", str(out), "--tracking-uri", servers["tracking"])
    assert pred.returncode == 0, pred.stdout + pred.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == expected.path.tolist()
    assert [r["prediction"] for r in rows] == expected.prediction.tolist()
    assert all(0 < float(r["probability"]) <= 1 for r in rows)


def test_pyfunc_classifies_raw_images_of_any_size_and_mode(servers, submitted):
    import mlflow
    import numpy as np
    from PIL import Image

    from components.inference.local import classify_images

    mlflow.set_tracking_uri(servers["tracking"])
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = [Image.new("RGB", (40, 25), (200, 10, 10)), Image.new("L", (7, 7), 128),
              Image.fromarray(np.zeros((64, 64, 4), np.uint8), "RGBA")]
    results = classify_images(model, images)
    assert len(results) == 3
    assert all(label in ("cat", "dog") and 0 < p <= 1 for label, p in results)


def test_predict_skips_unreadable_files_and_fails_only_when_none_is_read(servers, submitted,
                                                                         tmp_path):
    import shutil

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted((submitted["data"] / "cat").glob("[0-9]*.png"))[:2]  # not .hidden.png
    for f in good:
        shutil.copy(f, folder / f.name)
    (folder / "truncated.png").write_bytes(good[0].read_bytes()[:40])
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "p.csv"
    model = ["--model", f"models:/{MODEL}@champion", "--tracking-uri", servers["tracking"]]
    p = _cli(servers, "predict", *model, str(folder), "-o", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(Path(r["path"]).name for r in rows) == sorted(f.name for f in good)
    skipped = [line for line in p.stderr.splitlines() if line.startswith("visiontune: skipped")]
    assert len(skipped) == 2
    assert any("truncated.png" in line for line in skipped)
    assert any("empty.jpg" in line for line in skipped)

    for f in good:
        (folder / f.name).unlink()
    none = _cli(servers, "predict", *model, str(folder))
    assert none.returncode == 1
    assert "Traceback" not in none.stderr
    assert none.stderr.strip().splitlines()[-1] == \
        "visiontune: error: none of the 2 files could be read as an image"


def test_predict_on_the_cluster_from_a_bucket(servers, submitted, tmp_path):
    """`visiontune predict --ray --address` on the stock 2-node cluster, images in object
    storage: the same answers as one process reading the same bucket, and as the local files
    they were uploaded from; unreadable objects skipped by name, hidden ones never listed."""
    url = servers["s3"].upload_folder(submitted["data"], servers["bucket"], "incoming")
    model = ["--model", f"models:/{MODEL}@champion", "--tracking-uri", servers["tracking"]]
    on_ray = _cli(servers, "predict", *model, url, "-o", str(tmp_path / "ray.csv"), "--ray",
                  "--address", servers["gcs"])
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert f"on Ray (the cluster at {servers['gcs']})" in on_ray.stderr.splitlines()[0]
    assert "predict: 4 Ray Data workers (1 CPU each) load the model" in on_ray.stderr
    local = _cli(servers, "predict", *model, url, "-o", str(tmp_path / "local.csv"))
    assert local.returncode == 0, local.stderr[-3000:]
    assert "in this process" in local.stderr.splitlines()[0]
    files = _cli(servers, "predict", *model, str(submitted["data"]), "-o",
                 str(tmp_path / "files.csv"))
    assert files.returncode == 0, files.stderr[-3000:]
    ray_rows, local_rows, file_rows = (pd.read_csv(tmp_path / f"{n}.csv")
                                       for n in ("ray", "local", "files"))
    assert ray_rows.path.tolist() == local_rows.path.tolist()
    assert ray_rows.prediction.tolist() == local_rows.prediction.tolist()
    assert [p.replace(url, "") for p in ray_rows.path] == \
        [p.replace(str(submitted["data"]), "") for p in file_rows.path]
    assert ray_rows.prediction.tolist() == file_rows.prediction.tolist()
    assert (ray_rows.probability - file_rows.probability).abs().max() <= 1e-6
    assert not any("/." in p for p in ray_rows.path)            # .hidden.png never listed
    # relative local paths: the actors run in other directories, the output keeps the names
    rel = _cli(servers, "predict", *model, "images/dog", "-o", str(tmp_path / "rel.csv"),
               "--ray", "--address", servers["gcs"])
    assert rel.returncode == 0, rel.stderr[-3000:]
    rel_rows = pd.read_csv(tmp_path / "rel.csv")
    dogs = file_rows[file_rows.path.str.contains("/dog/")]
    assert rel_rows.path.tolist() == [p.replace(f"{servers['tmp']}/", "") for p in dogs.path]
    assert rel_rows.prediction.tolist() == dogs.prediction.tolist()
    prefix = "visiontune: skipped "
    skipped = sorted(line[len(prefix):].split(": ", 1)[0].rsplit("/", 1)[1]
                     for line in on_ray.stderr.splitlines() if line.startswith(prefix))
    assert skipped == ["empty.jpg", "not_an_image.png", "truncated.png"]
