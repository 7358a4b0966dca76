"""What every step shares: the parent run's record and the search plan."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from components import storage
from components.config import Config, ConfigError, to_dict
from components.models import build_model
from components.models.transfer import pretrained_weights_file
from components.names import new_id
from components.tracking import Journal, PipelineRecord, Tracker
from components.tuning.space import (
    TRIAL_SECTIONS,
    check_search,
    check_space,
    count_trials,
    grid_points,
    parse_space,
    set_params,
)
from pipelines.jobs import CLUSTER_ENV, JOB_ID_ENV

log = logging.getLogger(__name__)   # the console's lines (pipelines/console.py)
SOURCE_NAME = "visiontune run"  # the entry point, as the run page's "Source" names it


def new_pipeline_id() -> str:
    return new_id("vt")


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------- the record

def open_record(cfg: Config, resume: str | None,
                extra_tags: dict[str, str] | None) -> PipelineRecord:
    """The parent run: a new one, or with `resume` the run of that pipeline id (reopened
    unless it already finished)."""
    if resume:
        tracker = Tracker(cfg.tracking.uri, run_journal(cfg, resume))
        sent = tracker.send_journal()   # what the last attempt logged while the server was away
        if sent:
            log.info(f"[visiontune] {sent} journaled records of {resume} sent first")
        record = PipelineRecord.find(tracker, resume)
        if record is None:
            raise ConfigError(f"--resume {resume}: no pipeline run with that id in the MLflow "
                              f"store {cfg.tracking.uri}")
        if record.status() != "FINISHED":
            record.reopen()
            log.info(f"[visiontune] resuming pipeline {resume} (MLflow run {record.run_id})")
        return record

    tracker = Tracker(cfg.tracking.uri)
    tags = dict(extra_tags or {})
    if os.environ.get(JOB_ID_ENV):  # submitted with `visiontune submit`
        tags["visiontune.ray_job_id"] = os.environ[JOB_ID_ENV]
        tags["visiontune.ray_cluster_address"] = os.environ.get(CLUSTER_ENV, "")
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    # The run page's "Source": MlflowClient.create_run sets none of these by itself.
    tags.setdefault("mlflow.source.name", SOURCE_NAME)
    tags.setdefault("mlflow.source.type", "JOB" if os.environ.get(JOB_ID_ENV) else "LOCAL")
    experiment_id = tracker.ensure_experiment(cfg.tracking.experiment_name,
                                              cfg.tracking.artifact_location)
    from components.registry.hooks import shown_url  # the registry package imports MLflow

    config = to_dict(cfg)
    # Hook URLs often carry a token (Slack, Teams): recorded as scheme, host and first path
    # segment only; a run never sends hooks, promote and rollback read the config anew.
    config["registry"]["hooks"] = [shown_url(u) for u in config["registry"].get("hooks", [])]
    pipeline_id = new_pipeline_id()
    tracker.journal = run_journal(cfg, pipeline_id)
    return PipelineRecord.create(tracker, experiment_id, pipeline_id, tags, config,
                                 yaml.safe_dump(config, sort_keys=False))


def run_journal(cfg: Config, pipeline_id: str) -> Journal | None:
    """Where the run's processes journal what they log while the tracking server is away
    (`components.tracking.journal`): beside its checkpoints. None without a server, or with
    tracking.outage_grace_s=0 (a lost server stops the sweep)."""
    if (not cfg.tracking.uri.startswith(("http://", "https://"))
            or not cfg.tracking.outage_grace_s or not re.fullmatch(r"[\w.-]+", pipeline_id)):
        return None
    return Journal(storage.join(cfg.ray.storage_path, pipeline_id, "journal"),
                   cfg.tracking.outage_grace_s)


# ----------------------------------------------------------------------------- plan

@dataclass(frozen=True)
class SearchPlan:
    axes: list               # parsed search-space axes
    base: dict[str, Any]     # the config sections a trial's parameters are applied to
    num_trials: int


def plan_search(cfg: Config) -> SearchPlan:
    """Everything the search space implies, checked before data, Ray or MLflow are touched."""
    axes = parse_space(cfg.search.space)
    base = {s: getattr(cfg, s) for s in TRIAL_SECTIONS}
    check_space(axes, base, cfg.search.mode)
    check_search(cfg.search, axes)
    # Pretrained weights are needed on every worker: a missing file fails here, not in
    # every trial.
    for point in grid_points(axes, cfg.search.mode, base) or [{}]:
        m = set_params(base, point)["model"]
        if m.pretrained:
            pretrained_weights_file(m.name, m.weights_path)
    num_trials = count_trials(axes, cfg.search.mode, cfg.search.num_samples, base,
                              cfg.search.max_trials)
    # Checkpoints go there from every trial: a missing bucket or credentials fail here, once.
    storage.check_writable(cfg.ray.storage_path)
    return SearchPlan(axes, base, num_trials)


def model_sizes(cfg: Config, plan: SearchPlan) -> dict[str, int]:
    """The parameter count of each model the sweep trains (`model.name` and its searched
    values) by name, as built for this data: what the plan weighs data parallelism against."""
    names = {cfg.model.name}
    for axis in plan.axes:
        if axis.key == "model.name":
            names.update(axis.args if axis.kind in ("grid", "choice") else ())
    classes = 10  # the head's size barely moves the count; the data is not indexed yet here
    return {n: sum(p.numel() for p in build_model(dataclasses.replace(cfg.model, name=n),
                                                  classes, cfg.data.channels).parameters())
            for n in sorted(names)}
