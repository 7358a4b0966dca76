"""What a pipeline run records: rank 0's epochs on a trial's child run (`EpochLogger`) and the
pipeline's parent run with its steps (`PipelineRecord`)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from components.tracking.client import (
    CONFIG_FILE,
    PIPELINE_ID_TAG,
    ROLE_TAG,
    RUNNING,
    STEP_TAG,
    Tracker,
)

log = logging.getLogger(__name__)   # the steps' console lines (pipelines/console.py)


class EpochLogger:
    """Rank 0's view of a trial's child run: logs each epoch's metrics once.

    After a worker-group restart, epochs already in the run's history (up to the checkpoint
    the workers resumed from, or beyond it if they crashed after logging) are not logged again.
    """

    def __init__(self, tracker: Tracker, run_id: str, key: str = "val_f1"):
        self.tracker, self.run_id = tracker, run_id
        history = tracker.until_up(lambda: tracker.metric_history(run_id, key))
        # Epochs an earlier worker journaled while the server was away count as logged too.
        journaled = tracker.journal.max_step(run_id, key) if tracker.journal else 0
        self.last_logged_epoch = max([m.step for m in history] + [journaled])

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        if epoch <= self.last_logged_epoch:
            return False
        self.tracker.log_metrics(self.run_id, metrics, step=epoch)
        self.last_logged_epoch = epoch
        return True



T = TypeVar("T")


class PipelineRecord:
    """The MLflow parent run of one pipeline run: its config, what each step recorded, and how
    it ended. Steps write through it; `--resume` reads back from it (`run_step`)."""

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

    def run_step(self, name: str, compute: Callable[[], T], save: Callable[[T], None],
                 load: Callable[[], T] | None = None) -> T:
        """Step `name`, once per pipeline run: `compute()` its result and `save` it on this
        run; the step is tagged done only once both succeeded. A resumed run whose step is
        done gets its result back instead: `load()` reads it from this record or, with no
        `load` (a result that is deterministic and cheap, such as the test evaluation), it is
        computed again and not saved twice."""
        if self.step_done(name):
            if load is not None:
                return self.read_back(name, load)
            # Outside `step`: a failure now must not turn a recorded step back into "failed"
            # (the next resume would save its result a second time).
            log.info(f"[visiontune] {name}: done before; computed again, recorded once")
            return compute()
        with self.step(name):
            value = compute()
            save(value)
        return value

    def read_back(self, name: str, load: Callable[[], T]) -> T:
        """The result of step `name`, done before, read back from this run by `load`."""
        value = load()
        log.info(f"[visiontune] {name}: done before; its result read back from the run")
        return value

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Tag visiontune.step.<name> running -> done | failed, and time the step."""
        start = time.time()
        log.info(f"[visiontune] {name} ...")
        self.set_tags({STEP_TAG + name: "running"})
        try:
            yield
        except BaseException:
            with contextlib.suppress(Exception):  # the store itself may be what failed
                self.set_tags({STEP_TAG + name: "failed"})
            log.warning(f"[visiontune] {name} stopped after {time.time() - start:.1f}s")
            raise
        secs = time.time() - start
        self.log_metrics({f"step_seconds_{name}": secs})
        self.set_tags({STEP_TAG + name: "done"})
        log.info(f"[visiontune] {name} done in {secs:.1f}s")

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

    def log_table(self, frame, artifact_file: str) -> None:
        self.tracker.log_table(self.run_id, frame, artifact_file)

    def log_datasets(self, datasets: list[tuple[str, str, Any]], source: str, digest: str,
                     targets: str | None = None) -> None:
        self.tracker.log_datasets(self.run_id, datasets, source, digest, targets)
