"""The training pipeline: ingest -> validate -> split -> tune -> evaluate -> register.

Composition only: the steps live in `pipelines.steps`; this module sequences them, owns how
a run ends (FINISHED, KILLED by a signal, FAILED) and reads a run's result back from its
MLflow record.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from components.config import Config
from components.errors import UserError
from components.ui_links import review_links  # noqa: F401  (re-exported: the CLI, tests)
from pipelines.interrupt import SignalGuard, interrupted

if TYPE_CHECKING:   # the steps import torch, Ray and MLflow: imported where a run begins
    from components.tracking import PipelineRecord
    from components.tuning.driver import TrialResult
    from pipelines.steps import Extension, PreparedData, SearchPlan

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)


@dataclass
class PipelineResult:
    pipeline_id: str
    parent_run_id: str
    best_params: dict
    best_val_f1: float
    test_metrics: dict[str, float]
    model_uri: str
    registered_name: str
    registered_version: str
    aliases: tuple[str, ...]
    tracking_uri: str
    num_trials: int
    wall_seconds: float
    already_finished: bool = False   # `--resume` of a run that had finished: nothing was done
    experiment_id: str = ""


class PipelineFailed(UserError, RuntimeError):
    """The run ended FAILED (or could not be recorded); `pipeline_id` says which run."""

    def __init__(self, message: str, pipeline_id: str):
        super().__init__(message)
        self.pipeline_id = pipeline_id


SLOW_SERVER_GRACE_S = 60.0  # how long the start-up check waits for a server that is slow


def mlflow_ui_command(uri: str) -> str:
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def run_training_pipeline(cfg: Config, *, resume: str | None = None,
                          extra_tags: dict[str, str] | None = None,
                          extend_from: Config | None = None,
                          warm_start: str | None = None) -> PipelineResult:
    """Run the pipeline, or with `resume` (a pipeline id) continue that run; with
    `extend_from` (the config it finished with) as well, add the trials `cfg`'s larger budget
    adds (`pipelines.steps.extend`); `warm_start`: another run whose trials seed Optuna.
    Ctrl-C and SIGTERM raise `Interrupted` after the run was recorded as KILLED; nothing is
    registered from a run that did not finish. Its lines are logged (`pipelines.console`:
    the CLI prints them; elsewhere, `log_to_console()` does)."""
    from components.cluster import enable_token_auth

    if cfg.ray.address:
        # First, before anything imports ray: Ray reads its auth mode once, when it is
        # imported, and importing the steps imports it.
        enable_token_auth()
    # Here and in the functions below, not at the top: the steps import torch, Ray and MLflow,
    # and `run` must quiet MLflow's logging before MLflow is first imported (pipelines.cli).
    from components.tracking import StoreWatch, bound_http_retries, check_tracking_uri
    from pipelines import steps

    started = time.time()
    bound_http_retries()
    # An unsupported or unreachable store fails here, before data, Ray or a plan is touched;
    # one that is there but slow (restarting its workers) is given a minute.
    check_tracking_uri(cfg.tracking.uri, slow_grace_s=SLOW_SERVER_GRACE_S)
    plan = steps.plan_search(cfg)

    with SignalGuard() as guard:
        record, ext, data = _open(cfg, plan, resume, extend_from, extra_tags)
        if record.status() == "FINISHED":
            log.info(f"[visiontune] pipeline {record.pipeline_id} already finished: nothing to do")
            return result_from_record(record, cfg, time.time() - started,
                                      already_finished=True)
        log.info(f"[visiontune] pipeline {record.pipeline_id}: MLflow run {record.run_id} at "
                 f"{cfg.tracking.uri}")
        try:
            data = data or steps.prepare_data(cfg, record)
            seeds = steps.warm_start_seeds(cfg, warm_start, record) if warm_start else ()
            # A server that goes away is ridden out (the journal) for tracking.outage_grace_s.
            store = StoreWatch(record.tracker)
            with guard.noting():
                try:
                    trials = steps.tune_trials(
                        cfg, plan, data, record,
                        resume=bool(resume) and extend_from is None,
                        stop_requested=lambda: guard.requested or store.lost(),
                        ext=ext, seeds=seeds)
                except steps.SearchStopped:
                    guard.raise_if_requested()
                    raise
            guard.raise_if_requested()
            _evaluate_and_register(cfg, plan, data, trials, record, ext, guard)
        except BaseException as e:
            stop = interrupted(e)
            with guard.deferring():
                _close(record, "FAILED" if stop is None else "KILLED", ext)
            if stop is not None:
                stop.pipeline_id, stop.extension = record.pipeline_id, bool(ext and ext.number)
                raise stop
            failure = _failure(e, cfg, record.pipeline_id)
            if failure is e:
                raise
            raise failure from e
    if guard.requested:
        log.info("[visiontune] the signal came while the model was being registered: the run "
                 "finished first")
    return result_from_record(record, cfg, time.time() - started)


def _open(cfg: Config, plan: SearchPlan, resume: str | None, extend_from: Config | None,
          extra_tags: dict[str, str] | None
          ) -> tuple[PipelineRecord, Extension | None, PreparedData | None]:
    """(the parent run's record, the extension its sweep is in or None, the data when it was
    prepared already). An extension checks its data and reopens the run here, before
    anything can fail it: a refused extension leaves the run FINISHED."""
    from pipelines import steps

    record = steps.open_record(cfg, resume, extra_tags)
    if extend_from is not None:
        data = steps.prepare_data(cfg, record)
        ext = steps.begin_extension(cfg, extend_from, record, data.manifest, plan)
        return record, ext, data
    if resume and steps.extension_pending(record):
        if record.status() == "FINISHED":   # a stopped extension: the run stayed FINISHED
            record.reopen()
        log.info(f"[visiontune] continuing extension {steps.extension_of(record).number} of "
                 f"pipeline {record.pipeline_id}")
    return record, steps.extension_of(record) if resume else None, None


def _evaluate_and_register(cfg: Config, plan: SearchPlan, data: PreparedData,
                           trials: list[TrialResult], record: PipelineRecord,
                           ext: Extension | None, guard: SignalGuard) -> None:
    """The best trial on the test split, registered, and the run FINISHED. An extension
    whose best trial is the one already registered only refreshes the sweep's review."""
    from components.evaluation import select_best_trial
    from components.tracking import wait_and_send
    from pipelines import steps

    suffix = ext.suffix if ext is not None else ""
    # Nothing is evaluated or registered on a journal: the server has the whole record.
    wait_and_send(record.tracker, record.pipeline_id)
    before = steps.best_so_far(record) if suffix else None
    if before is not None and before == select_best_trial(trials).trial_id:
        log.info(f"  best trial unchanged ({before}, best of {len(trials)}): not evaluated or "
                 "registered again")
        steps.log_search_review(plan, trials, steps.sweep_importance(cfg, plan, trials),
                                record)
        _finish(record, suffix)
        return
    evaluation = steps.evaluate_best(cfg, plan, data, trials, record, suffix=suffix)
    wait_and_send(record.tracker, record.pipeline_id)   # gone again meanwhile?
    # Registering takes seconds; a signal now waits for it, so the registry never holds a
    # version of a run that is not FINISHED.
    with guard.deferring():
        steps.register_best(cfg, data.manifest, evaluation, record, suffix=suffix)
        _finish(record, suffix)


def _finish(record, suffix: str) -> None:
    from pipelines.steps.extend import EXTENSION_STATE_TAG

    if suffix:
        record.set_tags({EXTENSION_STATE_TAG: "done"})
    record.close("FINISHED")


def _close(record, status: str, ext=None) -> None:
    """Close the parent and every trial run still open. The store itself may be what
    failed: then the runs stay open until `--resume` continues them. A stopped extension
    leaves the parent FINISHED (its version is the one it finished with), tagged stopped."""
    from components.tracking import first_line
    from components.tracking.server import is_unreachable
    from pipelines.steps.extend import EXTENSION_STATE_TAG

    if ext is not None and ext.number:
        with contextlib.suppress(Exception):
            record.set_tags({EXTENSION_STATE_TAG: "stopped"})
        status = "FINISHED"

    for attempt in range(3):  # a busy store (SQLite locked by a dying trial) gets a retry
        try:
            try:
                record.close_open_trials("KILLED")
            except Exception as e:
                # A server that is away: the parent's status goes to the journal (below);
                # --resume sends it and closes the trials itself.
                if record.tracker.journal is None or not is_unreachable(e):
                    raise
            record.close(status)
            return
        except Exception as e:
            if attempt == 2 or "locked" not in str(e):
                log.warning(f"[visiontune] could not record the run as {status}: "
                            f"{first_line(e)}")
                return
            time.sleep(1)


def _failure(exc: BaseException, cfg: Config, pipeline_id: str) -> BaseException:
    """A lost tracking server, a full disk or a cluster that lost the nodes a trial needs
    says so in one line, with how to continue; anything else passes through unchanged."""
    from components.tracking import TrackingError, check_tracking_uri
    from components.tracking.journal import free_space, no_space

    if isinstance(exc, KeyboardInterrupt):
        return exc
    if no_space(exc) or getattr(getattr(exc, "outcome", None), "disk_full", False):
        path = cfg.ray.storage_path
        return PipelineFailed(f"no space left under ray.storage_path={path} (free: "
                              f"{free_space(path)}): the sweep stopped and nothing was "
                              f"registered; make space, then continue with: visiontune run "
                              f"--resume {pipeline_id}", pipeline_id)
    lost = getattr(getattr(exc, "outcome", None), "cluster_lost", None)
    if lost:
        return PipelineFailed(f"the sweep stopped: {lost}; nothing was registered; once the "
                              f"cluster has room, continue with: visiontune run --resume "
                              f"{pipeline_id}", pipeline_id)
    try:
        check_tracking_uri(cfg.tracking.uri, timeout_s=5)
    except TrackingError as lost:
        return PipelineFailed(f"the MLflow tracking store stopped answering during the run "
                              f"({lost}); once it is back, continue with: visiontune run "
                              f"--resume {pipeline_id}", pipeline_id)
    return exc


def result_from_record(record, cfg: Config, wall_seconds: float,
                       already_finished: bool = False) -> PipelineResult:
    """What a finished run's record says: the same summary after the run and on resume."""
    from components.registry import model_version_aliases
    from pipelines.steps import MODEL_URI_TAG, VERSION_TAG

    run = record.run()
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    version = tags.get(VERSION_TAG, "")
    name = params.get("registry.model_name", cfg.registry.model_name)
    aliases: tuple[str, ...] = ()
    with contextlib.suppress(Exception):
        aliases = model_version_aliases(record.tracker, name, version) if version else ()
    return PipelineResult(
        pipeline_id=record.pipeline_id, parent_run_id=record.run_id,
        best_params=best_params_of(params),
        best_val_f1=metrics.get("best_val_f1", float("nan")),
        test_metrics={k: v for k, v in metrics.items() if k.startswith("test_")},
        model_uri=tags.get(MODEL_URI_TAG, ""), registered_name=name, registered_version=version,
        aliases=aliases, tracking_uri=cfg.tracking.uri, experiment_id=record.experiment_id,
        num_trials=int(sum(metrics.get(f"trials_{s}", 0)
                           for s in ("finished", "killed", "failed"))),
        wall_seconds=wall_seconds, already_finished=already_finished)


def best_params_of(params: dict[str, str]) -> dict[str, str]:
    """The best trial's hyperparameters from the run's parameters: the latest extension's
    that evaluated a new best (`x2.best.*`), else the first sweep's (`best.*`)."""
    from pipelines.steps.extend import best_prefix

    prefix = best_prefix(params) + "best."
    return {k.removeprefix(prefix): v for k, v in params.items() if k.startswith(prefix)}


def summary(result: PipelineResult) -> str:
    params = "\n".join(f"    {k} = {v}" for k, v in result.best_params.items()) or "    (none)"
    m = result.test_metrics
    head = (f"visiontune run {result.pipeline_id} had already finished (nothing new registered)"
            if result.already_finished else
            f"visiontune run {result.pipeline_id} finished in {result.wall_seconds:.0f}s")
    return (
        f"\n{head} ({result.num_trials} trials)\n"
        f"  best hyperparameters:\n{params}\n"
        f"  val F1:  {result.best_val_f1:.4f}  (selection score: the best trial's, "
        f"optimistic)\n"
        f"  test F1: {m.get('test_f1', float('nan')):.4f}  {_interval(m)}accuracy "
        f"{m.get('test_accuracy', float('nan')):.4f}, precision "
        f"{m.get('test_precision', float('nan')):.4f}, recall "
        f"{m.get('test_recall', float('nan')):.4f})\n"
        f"  model:   {result.model_uri}\n"
        f"  registered: models:/{result.registered_name}/{result.registered_version} "
        f"(aliases: {', '.join(result.aliases) or 'none'})\n"
        f"{review_text(result)}")


def _interval(test_metrics: dict) -> str:
    if "test_f1_low" not in test_metrics:   # a run from before the interval
        return "("
    return (f"[{test_metrics['test_f1_low']:.4f}, {test_metrics['test_f1_high']:.4f}] (95% "
            f"interval over the test images; ")


def review_text(result: PipelineResult) -> str:
    """Where a person looks first: for a local store, the command that serves the UI, then
    the links."""
    uri = result.tracking_uri
    links = review_links(uri, result.experiment_id, result.parent_run_id,
                         result.registered_name, result.registered_version)
    head = ("  review in the MLflow UI:\n" if uri.startswith(("http://", "https://")) else
            f"  review: {mlflow_ui_command(uri)}   then open\n")
    labels = {"run": "this run", "runs": "all runs", "model": "the version"}
    return head + "".join(f"    {labels[k] + ':':<12} {v}\n" for k, v in links.items())
