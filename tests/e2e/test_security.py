"""No secret in the record: the shared tiny run (tests/e2e/conftest.py) ran with credentials in
its environment as an operator passes them (MLflow user, password and token, an AWS secret
key). Everything that run left on the real `mlflow server` - params, tags, metrics, datasets,
the registered model and version, the LoggedModel with its own files and every artifact's
bytes - is searched for them."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from tests.e2e.conftest import PLANTED

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _texts_of_run(client: MlflowClient, run, folder: Path) -> list[str]:
    data = run.data
    texts = [run.info.run_name or "", *data.params, *data.params.values(), *data.tags,
             *data.tags.values(), *data.metrics]
    for i in run.inputs.dataset_inputs:
        texts += [i.dataset.name, i.dataset.source, i.dataset.profile or "",
                  i.dataset.schema or "", *(t.value for t in i.tags)]
    local = Path(client.download_artifacts(run.info.run_id, "", str(folder)))
    texts += [f.read_bytes().decode("latin-1") for f in local.rglob("*") if f.is_file()]
    return texts


def test_no_planted_secret_anywhere_in_the_record(served_pipeline, tmp_path):
    client = MlflowClient(served_pipeline["uri"])
    version = client.get_model_version_by_alias(served_pipeline["model"], "champion")
    parent = client.get_run(version.run_id)
    runs = [parent, *client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")]
    assert len(runs) >= 3   # the pipeline and its trials
    texts = []
    for i, run in enumerate(runs):
        texts += _texts_of_run(client, run, tmp_path / str(i))
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    registered = client.get_registered_model(served_pipeline["model"])
    texts += [*model.params.values(), *model.tags.values(), version.description or "",
              *version.tags.values(), registered.description or "",
              *registered.tags.values()]
    # The model's own files (MLmodel, requirements, input example, code, network) live in the
    # LoggedModel's artifact location, not among the run's artifacts.
    files = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=model.artifact_location, dst_path=str(tmp_path / "model"),
        tracking_uri=served_pipeline["uri"]))
    model_files = [f for f in files.rglob("*") if f.is_file()]
    assert any(f.name == "MLmodel" for f in model_files), model_files
    texts += [f.read_bytes().decode("latin-1") for f in model_files]
    everything = "\n".join(texts)
    assert "logs/ray.log" in {a.path for a in client.list_artifacts(parent.info.run_id, "logs")}
    assert len(everything) > 10_000   # the artifacts were read, not just the tags
    for name, secret in PLANTED.items():
        assert secret not in everything, f"{name} leaked into the record"
    assert model.tags.get("mlflow.user") == "vt-user"   # its owner, as MLflow records it
