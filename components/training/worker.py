"""One training run, epoch by epoch, in whichever session runs it: a rank of a Ray Train
worker group (`train_loop_per_worker`, DDP) or a Tune trial's own process (`train_in_trial`).
The session (`components.training.session`) is the only thing that differs; the steps of an
epoch (`components.training.loop`) and what the ranks do together
(`components.training.ranks`) are the same for both.

What the run is given and reports is `spec` (`TrainJob`, `EpochMetrics`), its data `loaders`,
its checkpoint's files `checkpoint`, and what rank 0 records on the trial's run `rank0`."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import DataLoader

from components.augment import eval_preprocessing
from components.data.dataset import EpochShuffle, ImageDataset
from components.models import build_model
from components.models.freezing import build_param_groups, unfreeze
from components.timing import mark, timed
from components.training.checkpoint import read_checkpoint, restore_checkpoint, write_checkpoint
from components.training.loaders import FirstBatchClock, build_loaders, rss_mb
from components.training.loop import finished_metrics, track_best, train_one_epoch
from components.training.optim import build_optimizer, build_scheduler
from components.training.rank0 import recording
from components.training.ranks import (
    all_reduce_mean,
    evaluate_split,
    peak_rss_mb,
    state_dict,
    sync_buffers_from_rank0,
)
from components.training.session import RayTrainSession, TrainSession, TuneTrialSession
from components.training.spec import EpochMetrics, TrainJob

_IMPORTED = time.time()  # with components.training.IMPORT_STARTED: a worker's import cost


@dataclass
class _Run:
    """A training run once set up: what each epoch reads and updates."""

    job: TrainJob
    session: TrainSession
    prep: dict
    sampler: EpochShuffle
    train_loader: FirstBatchClock
    val_loader: DataLoader
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    when: str | None          # when the scheduler steps: per "batch", "epoch" or on "plateau"
    amp: bool
    scaler: object
    loss_fn: nn.Module
    state: dict = field(default_factory=lambda: {
        "epoch": 0, "best_val_f1": -1.0, "best_val_loss": float("inf"), "best_epoch": 0,
        "epochs_without_gain": 0, "stopped_early": False})
    best_weights: dict | None = None
    logger: object = None


def _set_up(job: TrainJob, session: TrainSession, resumed: dict | None, started: float,
            started_rss: float) -> tuple[_Run, ImageDataset]:
    """Data, model, optimizer and scheduler of the run; a resumed run continues from the
    saved state."""
    tc, mc = job.train, job.model
    prep = eval_preprocessing(job.data, job.model)
    train_ds, sampler, train_loader, val_loader = build_loaders(job, session, prep, started,
                                                                started_rss)
    model = build_model(mc, job.num_classes, job.data.channels)
    # Before DDP wraps the model: parameters frozen for good must already be excluded.
    groups = build_param_groups(model, tc.lr, freeze=mc.freeze, stage=mc.freeze_stage,
                                unfreeze_epoch=mc.unfreeze_epoch,
                                backbone_lr_mult=mc.backbone_lr_mult)
    optimizer = build_optimizer(tc.optimizer, groups, tc.lr, tc.weight_decay, tc.momentum,
                                tuple(tc.betas), tc.eps)
    scheduler, when = build_scheduler(tc.scheduler, optimizer, tc.epochs, len(train_loader),
                                      tc.step_size, tc.gamma)
    mark("worker_ddp", trial=session.name, rank=session.rank)
    model = session.prepare_model(model)
    amp = tc.amp and session.device.type == "cuda"
    run = _Run(job, session, prep, sampler, train_loader, val_loader, model, optimizer,
               scheduler, when, amp, torch.amp.GradScaler("cuda") if amp else None,
               nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing))
    mark("worker_model", trial=session.name, rank=session.rank)
    if resumed is not None:  # a restarted run continues where it stopped
        run.best_weights, run.state = restore_checkpoint(resumed, model, optimizer, scheduler)
    return run, train_ds


def _train_epoch(run: _Run, epoch: int, spans: dict[str, float]) -> EpochMetrics:
    """Train one epoch, validate rank 0's model on the whole val split, step the scheduler
    and the best-epoch record (`spans`: the seconds of training and of validation)."""
    tc, mc, device = run.job.train, run.job.model, run.session.device
    run.sampler.set_epoch(epoch)
    if mc.unfreeze_epoch is not None and epoch >= mc.unfreeze_epoch:
        unfreeze(run.optimizer, run.scheduler)
    with timed(spans, "train_s"):
        total, count = train_one_epoch(
            run.model, run.train_loader, run.optimizer, run.loss_fn, device, scaler=run.scaler,
            amp=run.amp, batch_scheduler=run.scheduler if run.when == "batch" else None,
            grad_clip=tc.grad_clip, l1=tc.l1)
        train_loss = all_reduce_mean(total, count, device)
    with timed(spans, "val_s"):
        # Validate (and save) one model: rank 0's, BatchNorm statistics included.
        sync_buffers_from_rank0(run.model)
        unwrapped = run.model.module if hasattr(run.model, "module") else run.model
        val = evaluate_split(unwrapped, run.val_loader, device, run.job.num_classes,
                             run.job.average, run.amp)
    if run.when == "epoch":
        run.scheduler.step()
    elif run.when == "plateau":
        run.scheduler.step(val["f1"])
    state = run.state
    improved, stop = track_best(state, epoch, val["f1"], val["loss"], tc.patience)
    if improved:
        run.best_weights = state_dict(run.model) if run.session.rank == 0 else None
    return EpochMetrics(
        epoch=epoch, train_loss=train_loss, val_loss=val["loss"],
        val_accuracy=val["accuracy"], val_precision=val["precision"],
        val_recall=val["recall"], val_f1=val["f1"], lr=run.optimizer.param_groups[0]["lr"],
        best_val_f1=state["best_val_f1"], best_val_loss=state["best_val_loss"],
        best_epoch=state["best_epoch"], early_stopped=int(stop),
        peak_rss_mb=peak_rss_mb(device),
        time_to_first_batch_s=run.train_loader.first_batch_s or 0.0,
        data_rss_mb=run.train_loader.data_rss_mb,
        images_decoded=run.train_loader.loader.dataset.decodes
        + run.val_loader.dataset.decodes)


def _end_epoch(run: _Run, metrics: EpochMetrics, spans: dict[str, float]) -> None:
    """Log the epoch (rank 0, to MLflow), checkpoint it (rank 0) and report it (every rank);
    the timing mark carries the epoch's spans."""
    session = run.session
    run.state["last_metrics"] = metrics.report()  # what a resumed ended run reports again
    spans.update(log_s=0.0, save_s=0.0)
    if session.rank == 0:
        if run.logger is not None:
            with timed(spans, "log_s"):
                run.logger.log_epoch(metrics.epoch, metrics.logged(run.job.metric_prefix))
        with tempfile.TemporaryDirectory() as d:
            with timed(spans, "save_s"):
                write_checkpoint(d, state_dict(run.model), run.optimizer, run.scheduler,
                                 run.best_weights, run.state, run.prep)
            with timed(spans, "report_s"):
                session.report(metrics.report(), checkpoint_dir=d)
    else:
        with timed(spans, "report_s"):
            session.report(metrics.report())
    mark("epoch", trial=session.name, rank=session.rank, epoch=metrics.epoch, **spans)


def run_training(job: TrainJob, session: TrainSession) -> None:
    """Train `job` in `session` from its last checkpoint (or from scratch), one report per
    epoch, until its epochs are done or patience stops it."""
    started, started_rss = time.monotonic(), rss_mb()
    from components.training import IMPORT_STARTED

    mark("worker_start", trial=session.name, rank=session.rank, model=job.model.name,
         import_started=IMPORT_STARTED, imported=_IMPORTED)
    torch.manual_seed(job.seed)  # same initial weights everywhere; DDP also broadcasts rank 0's
    checkpoint = session.checkpoint() or job.resume_from
    resumed = read_checkpoint(checkpoint) if checkpoint is not None else None
    if resumed is not None and (final := finished_metrics(resumed["state"], job.train.epochs)):
        session.report_again(final, checkpoint)   # nothing to train; no epoch logged twice
        return
    run, train_ds = _set_up(job, session, resumed, started, started_rss)
    with recording(job, session, train_ds, run.prep, first_start=checkpoint is None) as logger:
        run.logger = logger
        for epoch in range(run.state["epoch"] + 1, job.train.epochs + 1):
            spans: dict[str, float] = {}
            metrics = _train_epoch(run, epoch, spans)
            _end_epoch(run, metrics, spans)
            if metrics.early_stopped:
                break
    mark("worker_end", trial=session.name, rank=session.rank)


def train_loop_per_worker(config: dict) -> None:
    """The `TorchTrainer` entry point: one rank of a Ray Train worker group."""
    run_training(config["job"], RayTrainSession())


def train_in_trial(job: TrainJob) -> None:
    """Train in the Tune trial's own process (one worker, no worker group)."""
    from ray import tune

    cpus = tune.get_context().get_trial_resources().required_resources.get("CPU", 1)
    run_training(job, TuneTrialSession(cpus=cpus, use_gpu=job.train.use_gpu))
