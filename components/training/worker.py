"""The Ray Train worker adapter: every Ray touch point of training sits here (get_context,
prepare_model, get_checkpoint, report) around the plain loop in `components.training.loop`."""

from __future__ import annotations

import io
import json
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from components import storage
from components.augment import (
    build_eval_transform,
    build_train_transform,
    eval_preprocessing,
    plot_augmented_samples,
)
from components.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from components.data.dataset import EpochShuffle, ImageDataset, shard_indices, use_cache
from components.models import build_model
from components.models.freezing import build_param_groups, unfreeze
from components.timing import mark
from components.training.loop import finished_metrics, predict, track_best, train_one_epoch
from components.training.metrics import classification_metrics
from components.training.optim import build_optimizer, build_scheduler

_IMPORTED = time.time()  # with components.training.IMPORT_STARTED: a worker's import cost
MODEL_FILE, BEST_MODEL_FILE, STATE_FILE = "model.pt", "best_model.pt", "state.json"


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
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    metric_prefix: str = ""   # "fold2/" when the run is one fold of a cross-validation
    # The pipeline logs one grid of augmented samples on its parent run; a trial logs its own
    # only when it searches the augmentation (its grid differs from the parent's).
    log_augmented_samples: bool = False


def _gather(obj):
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def evaluate_split(model: nn.Module, loader, device, num_classes: int, average: str,
                   amp: bool = False) -> dict[str, float]:
    """Loss and metrics over the *whole* split: each rank predicts its own disjoint shard,
    then all predictions are gathered so every rank computes identical numbers."""
    idx, y, probs, losses = predict(model, loader, device, amp=amp)
    local = (idx.tolist(), y.tolist(), probs.argmax(1).tolist() if len(idx) else [],
             losses.tolist())
    rows = {}
    for part in _gather(local):
        for i, label, pred, loss in zip(*part):
            rows[i] = (label, pred, loss)
    labels = [rows[i][0] for i in sorted(rows)]
    preds = [rows[i][1] for i in sorted(rows)]
    metrics = classification_metrics(labels, preds, num_classes, average)
    metrics["loss"] = sum(r[2] for r in rows.values()) / max(len(rows), 1)
    return metrics


def _all_reduce_mean(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).item()


def _state_dict(model: nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def _sync_buffers_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts rank 0's buffers at the start of each training forward, so after an epoch's
    last batch every rank holds statistics updated by its own last batch. Rank 0 saves the
    checkpoint: validating before this sync would score a model no one saved. One broadcast
    per dtype and device: cheap next to an epoch, the same on gloo (CPU) and NCCL (GPU)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in model.buffers():  # same order on every rank: the same module tree
        groups.setdefault((b.dtype, b.device), []).append(b)
    with torch.no_grad():
        for buffers in groups.values():
            flat = torch.cat([b.reshape(-1) for b in buffers])
            dist.broadcast(flat, src=0)
            for b, part in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(part.view_as(b))


def _read_checkpoint(checkpoint) -> dict:
    with checkpoint.as_directory() as d:
        return {"saved": torch.load(Path(d) / MODEL_FILE, map_location="cpu", weights_only=True),
                "best": torch.load(Path(d) / BEST_MODEL_FILE, map_location="cpu",
                                   weights_only=True),
                "state": json.loads((Path(d) / STATE_FILE).read_text())}


def _report_again(metrics: dict, checkpoint, rank: int) -> None:
    """Report a run that had already ended, without training: the Train run was started again
    (a resumed sweep re-runs a trial whose last report Tune never recorded) and its caller
    waits for one report. Rank 0 re-attaches the checkpoint: Train copies the stored
    directory to a new one (not deleted as a local source), then drops the old one."""
    ray.train.report(metrics, checkpoint=checkpoint if rank == 0 else None,
                     delete_local_checkpoint_after_upload=False)


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
    train_ds = ImageDataset(
        [paths[i] for i in rows], [labels[i] for i in rows], channels, size,
        build_train_transform(job.augment.train, size, channels, prep["mean"], prep["std"],
                              seed=job.seed + rank),
        cache=cache, ids=rows)
    val_ds = ImageDataset([job.val_rows[0][i] for i in val_rows],
                          [job.val_rows[1][i] for i in val_rows], channels, size,
                          build_eval_transform(channels, prep["mean"], prep["std"]),
                          cache=cache, ids=val_rows)
    return train_ds, val_ds


def _peak_rss_mb(device) -> float:
    """The largest peak resident memory of any rank's process, in MiB."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = torch.tensor([mine], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _rank0_logger(job: TrainJob):
    """Rank 0's MLflow logger for the trial's run (created by the trial driver), after tagging
    the node it trains on."""
    from components.tracking import EpochLogger, Tracker  # MLflow is rank 0's business

    tracker = Tracker(job.tracking_uri)
    logger = EpochLogger(tracker, job.mlflow_run_id, key=job.metric_prefix + "val_f1")
    # Where the trial trained (rank 0's node): on a cluster, the first thing to look up
    # when one trial is slower or fails.
    tracker.set_tags(job.mlflow_run_id,
                     {"visiontune.node_id": ray.get_runtime_context().get_node_id()})
    return logger


def _log_augmented_samples(logger, train_ds, prep: dict, seed: int) -> None:
    import matplotlib.pyplot as plt

    fig = plot_augmented_samples([train_ds.image(i) for i in range(min(len(train_ds), 32))],
                                 train_ds.transform, prep["mean"], prep["std"], seed=seed)
    logger.tracker.log_figure(logger.run_id, fig, "augmented_samples.png")
    plt.close(fig)


def _save_and_report(metrics: dict, model, optimizer, scheduler, best_weights, state: dict,
                     prep: dict) -> float:
    """Rank 0: write the checkpoint (resume state, best weights, preprocessing) and report it
    with the epoch's metrics; returns the seconds spent writing it."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": _state_dict(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler else None},
                   Path(d) / MODEL_FILE)
        torch.save(best_weights, Path(d) / BEST_MODEL_FILE)
        (Path(d) / STATE_FILE).write_text(json.dumps(state))
        (Path(d) / "preprocessing.json").write_text(json.dumps(prep))
        saved = time.monotonic() - started
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
    return saved


def train_loop_per_worker(config: dict) -> None:
    started, started_rss = time.monotonic(), _rss_mb()
    job: TrainJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    name = ctx.get_experiment_name()
    from components.training import IMPORT_STARTED

    mark("worker_start", trial=name, rank=rank, model=job.model.name,
         import_started=IMPORT_STARTED, imported=_IMPORTED)

    torch.manual_seed(job.seed)  # same initial weights everywhere; DDP also broadcasts rank 0's
    device = ray.train.torch.get_device()
    tc = job.train
    checkpoint = ray.train.get_checkpoint()
    resumed = _read_checkpoint(checkpoint) if checkpoint is not None else None
    if resumed is not None:
        final = finished_metrics(resumed["state"], tc.epochs)
        if final is not None:  # nothing to train; no epoch is logged twice
            _report_again(final, checkpoint, rank)
            return
    prep = eval_preprocessing(job.data, job.model)

    train_ds, val_ds = _rank_datasets(job, rank, world, prep)
    mark("worker_data", trial=name, rank=rank)
    # Each rank reads only its own fixed shard of the train split, in a new order each epoch.
    sampler = EpochShuffle(len(train_ds), seed=job.seed + rank)
    pin = device.type == "cuda"
    # A last batch of one image breaks batch norm in training mode; drop the remainder
    # whenever a shard holds more than one batch. Shards are equally long: every rank runs
    # the same number of steps.
    workers = job.data.loader_workers
    # Object storage clients (the AWS SDK under pyarrow) are not safe across fork(): loader
    # processes for remote data start from a fresh interpreter.
    remote = any(storage.is_uri(p) for p in job.train_rows[0][:1])
    context = "forkserver" if workers and remote else None
    train_loader = _FirstBatchClock(DataLoader(
        train_ds, batch_size=tc.batch_size, sampler=sampler,
        drop_last=len(train_ds) > tc.batch_size, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, multiprocessing_context=context), started, started_rss,
        name, rank)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 256), num_workers=workers,
                            pin_memory=pin, multiprocessing_context=context)

    mc = job.model
    model = build_model(mc, job.num_classes, job.data.channels)
    # Before DDP wraps the model: parameters frozen for good must already be excluded.
    groups = build_param_groups(model, tc.lr, freeze=mc.freeze, stage=mc.freeze_stage,
                                unfreeze_epoch=mc.unfreeze_epoch,
                                backbone_lr_mult=mc.backbone_lr_mult)
    optimizer = build_optimizer(tc.optimizer, groups, tc.lr, tc.weight_decay, tc.momentum,
                                tuple(tc.betas), tc.eps)
    scheduler, when = build_scheduler(tc.scheduler, optimizer, tc.epochs, len(train_loader),
                                      tc.step_size, tc.gamma)
    mark("worker_ddp", trial=name, rank=rank)
    model = ray.train.torch.prepare_model(model)
    amp = tc.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if amp else None
    loss_fn = nn.CrossEntropyLoss(label_smoothing=tc.label_smoothing)
    mark("worker_model", trial=name, rank=rank)

    state = {"epoch": 0, "best_val_f1": -1.0, "best_val_loss": float("inf"), "best_epoch": 0,
             "epochs_without_gain": 0, "stopped_early": False}
    best_weights = None
    if resumed is not None:  # a restarted worker group continues where it stopped
        saved = resumed["saved"]
        (model.module if hasattr(model, "module") else model).load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None and saved.get("scheduler"):
            scheduler.load_state_dict(saved["scheduler"])
        best_weights, state = resumed["best"], resumed["state"]

    logger = None
    if rank == 0 and job.mlflow_run_id:
        logger = _rank0_logger(job)
        mark("worker_mlflow", trial=name, rank=rank)
        if (job.log_augmented_samples and checkpoint is None
                and job.metric_prefix in ("", "fold0/")):
            _log_augmented_samples(logger, train_ds, prep, job.seed)

    for epoch in range(state["epoch"] + 1, tc.epochs + 1):
        epoch_started = time.monotonic()
        sampler.set_epoch(epoch)
        if mc.unfreeze_epoch is not None and epoch >= mc.unfreeze_epoch:
            unfreeze(optimizer, scheduler)
        total, count = train_one_epoch(
            model, train_loader, optimizer, loss_fn, device, scaler=scaler, amp=amp,
            batch_scheduler=scheduler if when == "batch" else None, grad_clip=tc.grad_clip,
            l1=tc.l1)
        train_loss = _all_reduce_mean(total, count, device)
        trained = time.monotonic()
        # Validate (and save) one model: rank 0's, BatchNorm statistics included.
        _sync_buffers_from_rank0(model)
        unwrapped = model.module if hasattr(model, "module") else model
        val = evaluate_split(unwrapped, val_loader, device, job.num_classes, job.average, amp)
        if when == "epoch":
            scheduler.step()
        elif when == "plateau":
            scheduler.step(val["f1"])

        improved, stop = track_best(state, epoch, val["f1"], val["loss"], tc.patience)
        if improved:
            best_weights = _state_dict(model) if rank == 0 else None

        metrics = {"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"],
                   "val_accuracy": val["accuracy"], "val_precision": val["precision"],
                   "val_recall": val["recall"], "val_f1": val["f1"],
                   "lr": optimizer.param_groups[0]["lr"],
                   "best_val_f1": state["best_val_f1"], "best_val_loss": state["best_val_loss"],
                   "best_epoch": state["best_epoch"], "early_stopped": int(stop),
                   # the worker's cost: the most memory any rank held, and its start-up
                   "peak_rss_mb": _peak_rss_mb(device),
                   "time_to_first_batch_s": train_loader.first_batch_s or 0.0,
                   "data_rss_mb": train_loader.data_rss_mb}
        state["last_metrics"] = metrics  # what a resumed run that has ended reports again
        validated = time.monotonic()
        save_s = 0.0
        if rank == 0:
            if logger is not None:
                logger.log_epoch(epoch, {job.metric_prefix + k: v for k, v in metrics.items()
                                         if k not in ("epoch", "early_stopped")})
            logged = time.monotonic()
            save_s = _save_and_report(metrics, model, optimizer, scheduler, best_weights, state,
                                      prep)
        else:
            logged = validated
            ray.train.report(metrics)
        mark("epoch", trial=name, rank=rank, epoch=epoch, train_s=trained - epoch_started,
             val_s=validated - trained, log_s=logged - validated, save_s=save_s,
             report_s=time.monotonic() - logged - save_s)
        if stop:
            break
    mark("worker_end", trial=name, rank=rank)


def load_best_weights(checkpoint: str | Path) -> dict:
    """The best epoch's weights from a checkpoint directory: a local path or a URI on the
    run's storage (s3://..., read through the same filesystem Ray wrote it with)."""
    data = storage.read_bytes(storage.join(str(checkpoint), BEST_MODEL_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)

