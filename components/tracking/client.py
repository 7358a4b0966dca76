"""`Tracker`, the MLflow adapter every process of a run logs through: to the server, or, while
it does not answer, to the run's journal (`components.tracking.journal`).

Everything goes through an explicit tracking URI and `MlflowClient`, never MLflow's global
"active run", so the driver, Tune trials and Ray Train workers (other processes, other working
directories) all write to the same place and the same runs.
"""

from __future__ import annotations

import math
import re
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunStatus
from mlflow.exceptions import MlflowException

from components import storage
from components.tracking.journal import Journal, artifact_file
from components.tracking.server import PROBE_EVERY_S, TrackingError, is_unreachable, server_answers

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
T = TypeVar("T")


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

    def __init__(self, uri: str, journal: Journal | None = None):
        self.uri = uri
        self.journal = journal   # where writes go while the server does not answer
        self._client: MlflowClient | None = None
        # one writer at a time: rank 0's epochs and its system-metrics sampler share the
        # journal (its sequence numbers and temp names) and its sending
        self._lock = threading.RLock()

    def __getstate__(self):
        return {"uri": self.uri, "journal": self.journal, "_client": None}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.RLock()

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
        location = (Path(artifact_location).as_uri()
                    if artifact_location and not storage.is_uri(artifact_location)
                    else artifact_location)
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
        def get_or_create() -> str:
            existing = self.find_trial_run(experiment_id, parent_run_id, trial_id)
            if existing is not None:
                self.client.update_run(existing, status="RUNNING")
                return existing
            run_id = self.create_run(experiment_id, run_name,
                                     {ROLE_TAG: "trial", TRIAL_ID_TAG: trial_id}, parent_run_id)
            self.log_params(run_id, params)
            return run_id
        return self.until_up(get_or_create)

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
        self._write("end", run_id, status)

    def end_run_if_running(self, run_id: str, status: str) -> None:
        """Close a run that its own process could not close (killed by the scheduler, crashed)."""
        self._write("end_if_running", run_id, status)

    def close_trial_run(self, experiment_id: str, parent_run_id: str, trial_id: str,
                        status: str) -> None:
        """End the run of Tune trial `trial_id` if it is still RUNNING."""
        self._write("close_trial", experiment_id, parent_run_id, trial_id, status)

    # ------------------------------------------------------------------ logging
    # Every write goes through `_write`: to the server, or, while it does not answer and the
    # run has a journal, to the journal (components.tracking.journal), sent when it is back.
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self._write("params", run_id,
                    {k: str(v)[:_MAX_PARAM_LEN] for k, v in flatten(params).items()})

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int | None = None):
        finite = {k: float(v) for k, v in metrics.items()
                  if v is not None and math.isfinite(float(v))}
        self._write("metrics", run_id, finite, step or 0, int(time.time() * 1000))

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        self._write("tags", run_id, {k: str(v) for k, v in tags.items()})

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None):
        if Path(local_path).is_dir():   # a folder is logged after the sweep: no journal
            self.client.log_artifact(run_id, str(local_path), artifact_path)
        else:
            self._write("artifact", run_id, str(local_path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self._write("text", run_id, text, artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        import tempfile

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as d:
            figure.savefig(Path(d) / name)
            self.log_artifact(run_id, Path(d) / name, folder or None)

    def log_table(self, run_id: str, frame, artifact_file: str) -> None:
        """A pandas table as a CSV artifact (`evaluation/leaderboard.csv`): the file a reviewer
        downloads or opens in the artifact view. (MLflow's own `log_table` writes JSON.)"""
        import tempfile

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as d:
            frame.to_csv(Path(d) / name, index=False)
            self.log_artifact(run_id, Path(d) / name, folder or None)

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

    def model_metrics(self, model_id: str):
        """The LoggedModel's metrics (each with its dataset_name and dataset_digest)."""
        return self.client.get_logged_model(model_id).metrics or []

    def metric_history(self, run_id: str, key: str) -> list[Metric]:
        return self.client.get_metric_history(run_id, key)

    # ------------------------------------------------------------------ server or journal
    def _write(self, op: str, *args) -> None:
        journal = self.journal
        if journal is None:
            return self._apply(op, list(args))
        with self._lock:
            self._write_or_journal(journal, op, list(args))

    def _write_or_journal(self, journal: Journal, op: str, args: list) -> None:
        if journal.down_since is not None and not self._back():
            journal.append(op, args)
            return
        try:
            self._apply(op, args)
        except Exception as e:
            if not is_unreachable(e):
                raise
            journal.down_since = journal.down_since or time.time()
            journal.probed = time.monotonic()
            journal.append(op, args)

    def _back(self) -> bool:
        """Whether the server answers again (asked at most every PROBE_EVERY_S); if it does,
        what this process journaled meanwhile is sent first, in order."""
        journal = self.journal
        if time.monotonic() - journal.probed < PROBE_EVERY_S:
            return False
        journal.probed = time.monotonic()
        if not server_answers(self.uri):
            return False
        try:
            journal.send(self._apply, keep=is_unreachable, own=True)
        except Exception as e:
            if is_unreachable(e):
                return False
            raise
        journal.down_since = None
        return True

    def send_journal(self) -> int:
        """Send every process's journaled records (the driver's part: writers that died,
        the end of a sweep, a resume); returns how many."""
        if self.journal is None:
            return 0
        with self._lock:
            return self.journal.send(self._apply, keep=is_unreachable)

    def until_up(self, read: Callable[[], T]) -> T:
        """`read()`, asked again every PROBE_EVERY_S while the server does not answer and the
        run has a journal, for at most the journal's grace."""
        first = None
        while True:
            try:
                return read()
            except Exception as e:
                if self.journal is None or not is_unreachable(e):
                    raise
                first = first or time.monotonic()
                if time.monotonic() - first > self.journal.grace_s:
                    raise TrackingError(f"the tracking server {self.uri} has not answered for "
                                        f"{self.journal.grace_s:.0f} s") from None
                time.sleep(PROBE_EVERY_S)

    def _apply(self, op: str, args: list) -> None:
        getattr(self, f"_do_{op}")(*args)

    def _do_params(self, run_id: str, params: dict[str, str]) -> None:
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit
            self.client.log_batch(run_id, params=items[i:i + 100])

    def _do_metrics(self, run_id: str, metrics: dict[str, float], step: int, ts: int) -> None:
        batch = [Metric(k, v, ts, step) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(run_id, metrics=batch[i:i + 1000])

    def _do_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)

    def _do_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def _do_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        self.client.log_artifact(run_id, local_path, artifact_path)

    def _do_artifact_bytes(self, *args) -> None:
        with tempfile.TemporaryDirectory() as d:
            self._do_artifact(*artifact_file(list(args), d))

    def _do_end(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)

    def _do_end_if_running(self, run_id: str, status: str) -> None:
        if self.run_status(run_id) == RUNNING:
            self._do_end(run_id, status)

    def _do_close_trial(self, experiment_id: str, parent_run_id: str, trial_id: str,
                        status: str) -> None:
        run_id = self.find_trial_run(experiment_id, parent_run_id, trial_id)
        if run_id:
            self._do_end_if_running(run_id, status)
