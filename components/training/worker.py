"""One training run, epoch by epoch, in whichever session runs it: a rank of a Ray Train
worker group (`train_loop_per_worker`, DDP) or a Tune trial's own process (`train_in_trial`).
The session (`components.training.session`) is the only thing that differs; the steps of an
epoch (`components.training.loop`) and what the ranks do together
(`components.training.ranks`) are the same for both."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import ray
import torch
from torch import nn
from torch.utils.data import DataLoader

from components import storage
from components.augment import (
    build_eval_transform,
    build_train_transform,
    eval_preprocessing,
)
from components.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from components.data.dataset import (
    EpochShuffle,
    ImageDataset,
    seed_loader_worker,
    shard_indices,
    use_cache,
)
from components.data.preprocessed import DecodedLookup
from components.models import build_model
from components.models.freezing import build_param_groups, unfreeze
from components.timing import mark, timed
from components.training.checkpoint import (
    BEST_MODEL_FILE,
    MODEL_FILE,
    PREPROCESSING_FILE,
    STATE_FILE,
    read_checkpoint,
)
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

if TYPE_CHECKING:
    from components.tracking import Tracker

_IMPORTED = time.time()  # with components.training.IMPORT_STARTED: a worker's import cost


@dataclass
class TrainJob:
    """Everything one Ray Train run needs: the config sections of one trial, the data rows,
    and where rank 0 logs (an MLflow run the trial driver created)."""

    data: DataConfig
    augment: AugmentConfig
    model: ModelConfig
    train: TrainConfig
    average: str
    seed: int
    train_rows: tuple[list[str], list[int]]
    val_rows: tuple[list[str], list[int]]
    num_classes: int
    tracker: Tracker | None = None   # the run's (with its journal)
    mlflow_run_id: str | None = None
    metric_prefix: str = ""   # "fold2/" when the run is one fold of a cross-validation
    log_augmented_samples: bool = False   # only a trial that searches the augmentation
    decoded: tuple = ()   # the sweep's stores of decoded images (components.data.preprocessed)
    group_keys: dict = field(default_factory=dict)   # path -> its copy group (k-fold)
    resume_from: ray.train.Checkpoint | None = None   # when Ray's list was torn (driver._fit)
    system_metrics_s: float = 10.0   # rank 0 samples CPU, memory (GPU) this often; 0: off


def _rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _FirstBatchClock:
    """The train loader, noting how long the worker took to get its first batch (start-up,
    data reading and decoding included) and how much memory it gained until then
    (`data_rss_mb`: from the training function's start, so imports are not counted; the
    datasets, the model, the process group and the optimizer are, and a cache that fills
    during the first epoch is not yet)."""

    def __init__(self, loader: DataLoader, started: float, started_rss_mb: float,
                 name: str = "", rank: int = 0):
        self.loader, self.started, self.started_rss_mb = loader, started, started_rss_mb
        self.name, self.rank = name, rank
        self.first_batch_s: float | None = None
        self.data_rss_mb = 0.0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.first_batch_s is None:
                self.first_batch_s = time.monotonic() - self.started
                self.data_rss_mb = _rss_mb() - self.started_rss_mb
                mark("worker_first_batch", trial=self.name, rank=self.rank)
            yield batch


def _rank_datasets(job: TrainJob, rank: int, world: int, prep: dict):
    """This rank's train shard and val shard: nothing else is read or decoded here. With
    data.cache the decoded images of the shard are kept (when it fits: cache_max_mb)."""
    d, size, channels = job.data, job.data.image_size, job.data.channels
    paths, labels = job.train_rows
    rows = shard_indices(len(paths), rank, world, job.seed)
    # Validation: disjoint shards (no padding, which would count some images twice), run
    # through the unwrapped model so no DDP collective runs per batch. Rows keep their index
    # in the whole split.
    val_rows = list(range(rank, len(job.val_rows[0]), world))
    # A cache filled inside DataLoader worker processes would be lost with them (or copied
    # into each): with data.loader_workers > 0 every epoch decodes, in those processes.
    cache = d.loader_workers == 0 and use_cache(d.cache, len(rows) + len(val_rows), channels,
                                                size, d.cache_max_mb)
    decoded = DecodedLookup(job.decoded, size, channels) if job.decoded else None
    train_ds = ImageDataset(
        [paths[i] for i in rows], [labels[i] for i in rows], channels, size,
        build_train_transform(job.augment.train, size, channels, prep["mean"], prep["std"],
                              seed=job.seed + rank),
        cache=cache, ids=rows, decoded=decoded)
    val_ds = ImageDataset([job.val_rows[0][i] for i in val_rows],
                          [job.val_rows[1][i] for i in val_rows], channels, size,
                          build_eval_transform(channels, prep["mean"], prep["std"]),
                          cache=cache, ids=val_rows, decoded=decoded)
    return train_ds, val_ds


@dataclass
class EpochMetrics:
    """What one epoch reports to Ray (every key) and logs to MLflow (all but `epoch` and
    `early_stopped`, which the MLflow step and the run's status already say)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_precision: float
    val_recall: float
    val_f1: float
    lr: float
    best_val_f1: float
    best_val_loss: float
    best_epoch: int
    early_stopped: int
    # the run's cost: the most memory any rank held, and its start-up
    peak_rss_mb: float = 0.0
    time_to_first_batch_s: float = 0.0
    data_rss_mb: float = 0.0
    images_decoded: int = 0   # files rank 0 decoded so far (0 with the sweep's store)

    def report(self) -> dict:
        return asdict(self)

    def logged(self, prefix: str = "") -> dict:
        return {prefix + k: v for k, v in asdict(self).items()
                if k not in ("epoch", "early_stopped")}


@dataclass
class _Run:
    """A training run once set up: what each epoch reads and updates."""

    job: TrainJob
    session: TrainSession
    prep: dict
    sampler: EpochShuffle
    train_loader: _FirstBatchClock
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


def _loaders(job: TrainJob, session: TrainSession, prep: dict, started: float,
             started_rss: float):
    train_ds, val_ds = _rank_datasets(job, session.rank, session.world, prep)
    mark("worker_data", trial=session.name, rank=session.rank)
    # Each rank reads only its own fixed shard of the train split, in a new order each epoch.
    sampler = EpochShuffle(len(train_ds), seed=job.seed + session.rank)
    pin = session.device.type == "cuda"
    tc, workers = job.train, job.data.loader_workers
    # Object storage clients (the AWS SDK under pyarrow) are not safe across fork(): loader
    # processes for remote data start from a fresh interpreter.
    remote = any(storage.is_uri(p) for p in job.train_rows[0][:1])
    context = "forkserver" if workers and remote else None
    # A last batch of one image breaks batch norm in training mode; drop the remainder
    # whenever a shard holds more than one batch. Shards are equally long: every rank runs
    # the same number of steps.
    # Loader processes seed their augmentations from the generator (one per rank, seeded),
    # each its own: without it they all drew the same crops and flips.
    train_loader = _FirstBatchClock(DataLoader(
        train_ds, batch_size=tc.batch_size, sampler=sampler,
        drop_last=len(train_ds) > tc.batch_size, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, multiprocessing_context=context,
        worker_init_fn=seed_loader_worker if workers else None,
        generator=torch.Generator().manual_seed(job.seed + session.rank)), started,
        started_rss, session.name, session.rank)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 256), num_workers=workers,
                            pin_memory=pin, multiprocessing_context=context)
    return train_ds, sampler, train_loader, val_loader


def _set_up(job: TrainJob, session: TrainSession, resumed: dict | None, started: float,
            started_rss: float) -> tuple[_Run, ImageDataset]:
    """Data, model, optimizer and scheduler of the run; a resumed run continues from the
    saved state."""
    tc, mc = job.train, job.model
    prep = eval_preprocessing(job.data, job.model)
    train_ds, sampler, train_loader, val_loader = _loaders(job, session, prep, started,
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
        saved = resumed["saved"]
        (model.module if hasattr(model, "module") else model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler"):
            scheduler.load_state_dict(saved["scheduler"])
        run.best_weights, run.state = resumed["best"], resumed["state"]
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


def _write_checkpoint(run: _Run, folder: str) -> None:
    """Rank 0's checkpoint: the resume state, the best weights and the preprocessing."""
    torch.save({"model": state_dict(run.model), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict() if run.scheduler else None},
               Path(folder) / MODEL_FILE)
    torch.save(run.best_weights, Path(folder) / BEST_MODEL_FILE)
    (Path(folder) / STATE_FILE).write_text(json.dumps(run.state))
    (Path(folder) / PREPROCESSING_FILE).write_text(json.dumps(run.prep))


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
                _write_checkpoint(run, d)
            with timed(spans, "report_s"):
                session.report(metrics.report(), checkpoint_dir=d)
    else:
        with timed(spans, "report_s"):
            session.report(metrics.report())
    mark("epoch", trial=session.name, rank=session.rank, epoch=metrics.epoch, **spans)


def run_training(job: TrainJob, session: TrainSession) -> None:
    """Train `job` in `session` from its last checkpoint (or from scratch), one report per
    epoch, until its epochs are done or patience stops it."""
    started, started_rss = time.monotonic(), _rss_mb()
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
