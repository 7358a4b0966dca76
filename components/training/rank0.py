"""What rank 0 records on its trial's MLflow run while it trains: the node it trains on, each
epoch's metrics once (`EpochLogger`), the augmented samples, and the process's and node's
CPU, memory (and GPU) use over time (`components.tracking.system_metrics`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import ray

from components.augment import plot_augmented_samples
from components.timing import mark

SYSTEM_KEY = "system/process_rss_megabytes"   # where a restarted run's series goes on from


def _sampler(job, node_id: str):
    from components.tracking.system_metrics import SystemSampler

    tracker, run_id = job.tracker, job.mlflow_run_id
    history = tracker.until_up(lambda: tracker.metric_history(run_id, SYSTEM_KEY))
    journaled = tracker.journal.max_step(run_id, SYSTEM_KEY) if tracker.journal else 0
    steps = [m.step for m in history] + ([journaled] if journaled else [])
    step = max(steps) + 1 if steps else 0
    return SystemSampler(tracker, run_id, job.system_metrics_s, start_step=step).start()


@contextlib.contextmanager
def recording(job, session, train_ds, prep: dict, first_start: bool) -> Iterator:
    """Rank 0's `EpochLogger` for the trial's run (None on other ranks or without a run), with
    the system metrics sampled for as long as the block trains."""
    if session.rank != 0 or not job.mlflow_run_id:
        yield None
        return
    from components.tracking import EpochLogger  # MLflow is rank 0's business

    tracker = job.tracker
    logger = EpochLogger(tracker, job.mlflow_run_id, key=job.metric_prefix + "val_f1")
    # Where the trial trained (rank 0's node): on a cluster, the first thing to look up when
    # one trial is slower or fails; the system metrics are this node's.
    node_id = ray.get_runtime_context().get_node_id()
    tracker.set_tags(job.mlflow_run_id, {"visiontune.node_id": node_id,
                                         "visiontune.system_metrics_node": node_id})
    mark("worker_mlflow", trial=session.name, rank=session.rank)
    if job.log_augmented_samples and first_start and job.metric_prefix in ("", "fold0/"):
        _log_augmented_samples(logger, train_ds, prep, job.seed)
    sampler = _sampler(job, node_id) if job.system_metrics_s > 0 else None
    try:
        yield logger
    finally:
        if sampler is not None:
            sampler.stop()


def _log_augmented_samples(logger, train_ds, prep: dict, seed: int) -> None:
    import matplotlib.pyplot as plt

    fig = plot_augmented_samples([train_ds.image(i) for i in range(min(len(train_ds), 32))],
                                 train_ds.transform, prep["mean"], prep["std"], seed=seed)
    logger.tracker.log_figure(logger.run_id, fig, "augmented_samples.png")
    plt.close(fig)
