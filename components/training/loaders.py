"""A rank's data: its shards of the train and val splits as datasets (`rank_datasets`) and
their loaders (`build_loaders`), the train loader timed to its first batch (`FirstBatchClock`:
start-up and the memory the data took, reported with every epoch)."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader

from components import storage
from components.augment import build_eval_transform, build_train_transform
from components.data.dataset import (
    EpochShuffle,
    ImageDataset,
    seed_loader_worker,
    shard_indices,
    use_cache,
)
from components.data.preprocessed import DecodedLookup
from components.timing import mark
from components.training.spec import TrainJob

if TYPE_CHECKING:
    from components.training.session import TrainSession


def rss_mb() -> float:
    """This process's resident memory now, in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class FirstBatchClock:
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
                self.data_rss_mb = rss_mb() - self.started_rss_mb
                mark("worker_first_batch", trial=self.name, rank=self.rank)
            yield batch


def rank_datasets(job: TrainJob, rank: int, world: int, prep: dict):
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


def build_loaders(job: TrainJob, session: TrainSession, prep: dict, started: float,
                  started_rss: float):
    """This rank's train dataset, its sampler (a new order each epoch), the train loader (timed to
    its first batch) and the val loader."""
    train_ds, val_ds = rank_datasets(job, session.rank, session.world, prep)
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
    train_loader = FirstBatchClock(DataLoader(
        train_ds, batch_size=tc.batch_size, sampler=sampler,
        drop_last=len(train_ds) > tc.batch_size, num_workers=workers, pin_memory=pin,
        persistent_workers=workers > 0, multiprocessing_context=context,
        worker_init_fn=seed_loader_worker if workers else None,
        generator=torch.Generator().manual_seed(job.seed + session.rank)), started,
        started_rss, session.name, session.rank)
    val_loader = DataLoader(val_ds, batch_size=max(tc.batch_size, 256), num_workers=workers,
                            pin_memory=pin, multiprocessing_context=context)
    return train_ds, sampler, train_loader, val_loader
