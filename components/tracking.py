"""The one MLflow adapter: experiment and run tree, rank-0 epoch logging, artifacts, models.

Everything goes through an explicit tracking URI and `MlflowClient`, never MLflow's global
"active run", so the driver, Tune trials and Ray Train workers (other processes, other working
directories) all write to the same place and the same runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

PARENT_RUN_ID_TAG = "mlflow.parentRunId"
ROLE_TAG = "visiontune.role"
TRIAL_ID_TAG = "visiontune.trial_id"
PIPELINE_ID_TAG = "visiontune.pipeline_id"
STEP_TAG = "visiontune.step."
DATASET_CONTEXT_TAG = "mlflow.data.context"  # what the run page's "Datasets" shows per input
DATASET_DIGEST_CHARS = 36  # MLflow's SQL stores hold a dataset digest of at most 36 characters
DATASET_RACE_RETRIES = 3
# how SQLite, PostgreSQL and MySQL word a unique-key violation, as a tracking server relays it
_DUPLICATE_KEY = re.compile(r"UNIQUE constraint failed|duplicate key value|Duplicate entry")
CONFIG_FILE = "config.yaml"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
RUNNING = RunStatus.to_string(RunStatus.RUNNING)

# MLflow's own defaults (7 retries, backoff factor 2, 120 s per request) make every call to a
# server that went away block for minutes; these bound one call to well under a minute.
# A value the user exported wins.
HTTP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingError(RuntimeError):
    """The tracking store cannot be used: an unsupported URI, a server that does not answer."""


def bound_http_retries() -> dict[str, str]:
    """Export bounded MLflow HTTP retries to this process and the Ray processes it starts;
    returns the values in force (a submitted job gets them in its runtime_env)."""
    for key, value in HTTP_RETRY_ENV.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in HTTP_RETRY_ENV}


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def check_tracking_uri(uri: str, timeout_s: int = 10) -> None:
    """One real call to the store, without MLflow's retries: an unsupported scheme or a server
    that is not there fails in seconds, before Ray starts or any data is read."""
    saved = {k: os.environ.get(k) for k in HTTP_RETRY_ENV}
    os.environ.update({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s)})
    try:
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as e:  # unsupported scheme, refused connection, missing driver, bad auth
        # A refused or timed-out connection is buried in urllib3's text; say just that.
        refused = re.search(r"\[Errno -?\d+\] [^\"')(]+|timed out", str(e))
        reason = refused.group(0).strip() if refused else first_line(e)
        raise TrackingError(f"cannot use the MLflow tracking store tracking.uri={uri}: "
                            f"{reason}") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and k != "space":
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_duplicate_key(error: MlflowException) -> bool:
    return bool(_DUPLICATE_KEY.search(str(error)))


class Tracker:
    """A tracking URI plus a lazily built client; cheap to pickle into Ray tasks."""

    def __init__(self, uri: str):
        self.uri = uri
        self._client: MlflowClient | None = None

    def __getstate__(self):
        return {"uri": self.uri, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    # ------------------------------------------------------------------ experiments and runs
    def ensure_experiment(self, name: str, artifact_location: str | None = None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        # Explicit: MLflow's default artifact root is ./mlruns of whichever process creates
        # the experiment, e.g. a temporary directory under `ray job submit`.
        location = Path(artifact_location).as_uri() if artifact_location and "://" not in \
            artifact_location else artifact_location
        return self.client.create_experiment(name, artifact_location=location)

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str],
                   parent_run_id: str | None = None) -> str:
        tags = dict(tags)
        if parent_run_id:
            tags[PARENT_RUN_ID_TAG] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        return run.info.run_id

    def get_or_create_trial_run(self, experiment_id: str, parent_run_id: str, trial_id: str,
                                run_name: str, params: dict[str, Any]) -> str:
        """The child run of one Tune trial. A retried trial (same trial id) continues its run
        instead of creating a second one."""
        existing = self.find_trial_run(experiment_id, parent_run_id, trial_id)
        if existing is not None:
            self.client.update_run(existing, status="RUNNING")
            return existing
        run_id = self.create_run(experiment_id, run_name,
                                 {ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id}, parent_run_id)
        self.log_params(run_id, params)
        return run_id

    def find_trial_run(self, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_run_id}' and "
                          f"tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def child_runs(self, experiment_id: str, parent_run_id: str):
        return self.client.search_runs(
            [experiment_id], filter_string=f"tags.`{PARENT_RUN_ID_TAG}` = '{parent_run_id}'",
            max_results=10000)

    def run_status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_run_if_running(self, run_id: str, status: str) -> bool:
        """Close a run that its own process could not close (killed by the scheduler, crashed)."""
        if self.run_status(run_id) == RUNNING:
            self.end_run(run_id, status)
            return True
        return False

    # ------------------------------------------------------------------ logging
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None):
        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, str(v))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None):
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_datasets(self, run_id: str, datasets: list[tuple[str, str, Any]], source: str,
                     digest: str, targets: str | None = None) -> None:
        """Each `(name, context, pandas frame)` as a dataset input of the run, all from
        `source` (a path or URI) with `digest`. Logging the same inputs again adds nothing."""
        import warnings

        import mlflow.data
        from mlflow.entities import Dataset, DatasetInput, InputTag

        def dataset(frame, name: str):
            kwargs = dict(name=name, digest=digest[:DATASET_DIGEST_CHARS], targets=targets)
            with warnings.catch_warnings():  # "file://" matches two equivalent local sources
                warnings.simplefilter("ignore", UserWarning)
                try:
                    return mlflow.data.from_pandas(frame, source=source, **kwargs)
                except MlflowException:  # a scheme MLflow has no dataset source for
                    return mlflow.data.from_pandas(frame, **kwargs)

        inputs = [DatasetInput(Dataset(**dataset(frame, name).to_dict()),
                               [InputTag(DATASET_CONTEXT_TAG, context)])
                  for name, context, frame in datasets]
        for attempt in range(DATASET_RACE_RETRIES + 1):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except MlflowException as e:
                # Two runs logging the same dataset at once: the SQL store looks the dataset
                # up, then inserts it, and the slower insert fails on the unique key. The
                # row exists now, so the same call again links it (seen with two promotes).
                if attempt == DATASET_RACE_RETRIES or not _is_duplicate_key(e):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_model_metrics(self, run_id: str, model_id: str, metrics: dict[str, float],
                          dataset_name: str, dataset_digest: str) -> None:
        """Metrics of the LoggedModel `model_id` on one dataset (MLflow 3's lineage: the model
        page lists them with the dataset's name and digest)."""
        for key, value in metrics.items():
            self.client.log_metric(run_id, key, float(value), model_id=model_id,
                                   dataset_name=dataset_name,
                                   dataset_digest=dataset_digest[:DATASET_DIGEST_CHARS])

    def download_model(self, model_uri: str, dst: str | Path) -> str:
        """A logged (`models:/m-<id>`) or registered (`models:/NAME/VERSION`) model's files,
        from this store. Resolved here: MLflow resolves a `models:/` URI through the default
        store (`MLFLOW_TRACKING_URI`) even when given another tracking URI, and a model of
        this store is then "not found" (seen with a job's environment)."""
        source = model_uri
        if model_uri.startswith("models:/m-"):
            source = self.client.get_logged_model(
                model_uri.removeprefix("models:/")).artifact_location
        elif model_uri.startswith("models:/"):
            name, _, version = model_uri.removeprefix("models:/").rpartition("/")
            source = self.client.get_model_version_download_uri(name, version)
            if source.startswith("models:/m-"):
                return self.download_model(source, dst)
        return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst),
                                                   tracking_uri=self.uri)

    def model_code_digest(self, model_uri: str) -> str:
        """The sha256 of each file of the logged model (see components.serving), as the
        registry tag value: read back from the artifact store, as every loader will read it."""
        import tempfile

        from components.serving import code_digests, format_digests

        with tempfile.TemporaryDirectory() as d:
            return format_digests(code_digests(self.download_model(model_uri, d)))

    def model_metrics(self, model_id: str):
        """The LoggedModel's metrics (each with its dataset_name and dataset_digest)."""
        return self.client.get_logged_model(model_id).metrics or []

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self.client.get_metric_history(run_id, key)

    # ------------------------------------------------------------------ models
    def log_image_classifier(self, run_id: str, model, class_names: list[str],
                             preprocessing: dict, metadata: dict, name: str = "model") -> str:
        """Log `model` (an nn.Module returning logits, eval mode) as visiontune's image
        classifier: an MLflow pyfunc from code (`components/serving/image_classifier.py`,
        copied into the model) that takes raw image bytes or paths and carries its own
        preprocessing, and the network as a torch.export program (artifact `weights`), so
        `mlflow models serve` and `mlflow.pyfunc.load_model` need nothing from this repository.
        Returns the model URI."""
        import copy
        import tempfile

        import pandas as pd
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, DataType, Schema

        from components.serving import (
            MODEL_CODE,
            MODEL_FORMAT,
            PREPROCESSING_CODE,
            WEIGHTS_FILE,
            example_image_bytes,
            export_network,
            pip_requirements,
        )

        c, size = preprocessing["channels"], preprocessing["image_size"]
        signature = ModelSignature(
            inputs=Schema([ColSpec(DataType.binary, "image", required=False),
                           ColSpec(DataType.string, "path", required=False)]),
            outputs=Schema([ColSpec(DataType.string, "prediction"),
                            ColSpec(DataType.double, "probability"),
                            *(ColSpec(DataType.double, f"prob_{k}") for k in class_names),
                            ColSpec(DataType.string, "error", required=False)]))
        mlflow.set_tracking_uri(self.uri)
        with tempfile.TemporaryDirectory() as d:
            weights = export_network(model, c, size, Path(d) / WEIGHTS_FILE)
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pyfunc.log_model(
                    name=name, python_model=str(MODEL_CODE), artifacts={"weights": str(weights),
                                                     "preprocessing": str(PREPROCESSING_CODE)},
                    model_config={"class_names": [str(k) for k in class_names],
                                  "preprocessing": copy.deepcopy(preprocessing)},
                    signature=signature,
                    input_example=pd.DataFrame({"image": [example_image_bytes(c, size)]}),
                    metadata={**metadata, "model_format": MODEL_FORMAT},
                    pip_requirements=pip_requirements())
        # start_run(run_id=...) ends the run on exit; the pipeline decides its final status.
        self.client.update_run(run_id, status="RUNNING")
        return info.model_uri


class EpochLogger:
    """Rank 0's view of a trial's child run: logs each epoch's metrics once.

    After a worker-group restart, epochs already in the run's history (up to the checkpoint
    the workers resumed from, or beyond it if they crashed after logging) are not logged again.
    """

    def __init__(self, tracker: Tracker, run_id: str, key: str = "val_f1"):
        self.tracker, self.run_id = tracker, run_id
        history = tracker.metric_history(run_id, key)
        self.last_logged_epoch = max((m.step for m in history), default=0)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        if epoch <= self.last_logged_epoch:
            return False
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)
        self.last_logged_epoch = epoch
        return True



class PipelineRecord:
    """The MLflow parent run of one pipeline run: its config, what each step recorded, and how
    it ended. Steps write through it; `--resume` reads back from it."""

    def __init__(self, tracker: Tracker, experiment_id: str, run_id: str, pipeline_id: str):
        self.tracker, self.experiment_id = tracker, experiment_id
        self.run_id, self.pipeline_id = run_id, pipeline_id

    @classmethod
    def create(cls, tracker: Tracker, experiment_id: str, pipeline_id: str,
               tags: dict[str, str], config: dict, config_yaml: str) -> PipelineRecord:
        tags = {ROLE_TAG: "pipeline", PIPELINE_ID_TAG: pipeline_id, **tags}
        record = cls(tracker, experiment_id,
                     tracker.create_run(experiment_id, pipeline_id, tags), pipeline_id)
        record.log_params(config)
        record.log_text(config_yaml, CONFIG_FILE)
        return record

    @classmethod
    def find(cls, tracker: Tracker, pipeline_id: str) -> PipelineRecord | None:
        """The parent run tagged with `pipeline_id`, in whichever experiment it is."""
        if "'" in pipeline_id:
            return None
        experiments = [e.experiment_id for e in tracker.client.search_experiments()]
        runs = tracker.client.search_runs(
            experiments, f"tags.`{PIPELINE_ID_TAG}` = '{pipeline_id}' and "
                         f"tags.`{ROLE_TAG}` = 'pipeline'", max_results=1) if experiments else []
        if not runs:
            return None
        return cls(tracker, runs[0].info.experiment_id, runs[0].info.run_id, pipeline_id)

    # ------------------------------------------------------------------ reading back
    def run(self):
        return self.tracker.client.get_run(self.run_id)

    def status(self) -> str:
        return self.tracker.run_status(self.run_id)

    def config_text(self) -> str:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            return Path(self.tracker.client.download_artifacts(
                self.run_id, CONFIG_FILE, d)).read_text()

    def step_done(self, name: str) -> bool:
        return self.run().data.tags.get(STEP_TAG + name) == "done"

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        return Path(self.tracker.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    # ------------------------------------------------------------------ writing
    def reopen(self) -> None:
        self.tracker.client.update_run(self.run_id, status="RUNNING")

    def close(self, status: str) -> None:
        self.tracker.end_run(self.run_id, status)

    def close_open_trials(self, status: str) -> int:
        """End every trial run still RUNNING (its trial was stopped with the sweep)."""
        closed = 0
        for run in self.tracker.child_runs(self.experiment_id, self.run_id):
            if run.info.status == RUNNING:
                self.tracker.end_run(run.info.run_id, status)
                closed += 1
        return closed

    @contextlib.contextmanager
    def step(self, name: str, echo: Callable[[str], None]) -> Iterator[None]:
        """Tag visiontune.step.<name> running -> done | failed, and time the step."""
        start = time.time()
        echo(f"[visiontune] {name} ...")
        self.set_tags({STEP_TAG + name: "running"})
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the store itself may be what failed
                self.set_tags({STEP_TAG + name: "failed"})
            echo(f"[visiontune] {name} stopped after {time.time() - start:.1f}s")
            raise
        secs = time.time() - start
        self.log_metrics({f"step_seconds_{name}": secs})
        self.set_tags({STEP_TAG + name: "done"})
        echo(f"[visiontune] {name} done in {secs:.1f}s")

    def log_params(self, params: dict[str, Any]) -> None:
        self.tracker.log_params(self.run_id, params)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        self.tracker.log_metrics(self.run_id, metrics)

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.tracker.set_tags(self.run_id, tags)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, local_path, artifact_path)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.tracker.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        self.tracker.log_figure(self.run_id, figure, artifact_file)

    def log_datasets(self, datasets: list[tuple[str, str, Any]], source: str, digest: str,
                     targets: str | None = None) -> None:
        self.tracker.log_datasets(self.run_id, datasets, source, digest, targets)


class StoreWatch:
    """Polled from a long loop (the sweep): says the tracking store is lost after `failures`
    checks in a row failed, at most one check every `every_s` seconds. Without it a lost
    server is noticed only when a trial's own logging has failed through all its retries."""

    def __init__(self, uri: str, every_s: float = 10.0, failures: int = 2):
        self.uri, self.every_s, self.failures = uri, every_s, failures
        self._last, self._failed = time.monotonic(), 0

    def lost(self) -> bool:
        if self._failed < self.failures and time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            try:
                check_tracking_uri(self.uri, timeout_s=5)
                self._failed = 0
            except TrackingError:
                self._failed += 1
        return self._failed >= self.failures
