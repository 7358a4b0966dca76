"""Data that does not fit in a worker: the old loading (every Train worker decodes the whole
train split before its first batch) against the two a trial uses now: each rank reads only
its own shard, decoding as it goes (cached only when the shard fits `data.cache_max_mb`), or
reads its own rows from the sweep's store of decoded images (`data.preprocess`, the default:
built once by the validate step, read with pread, nothing decoded in the worker).

One run measures all three, side by side, on the same generated folder (at least 20,000 RGB images
at 128 px, written once under ~/.cache/visiontune/, never committed): one Ray Train run of
2 workers x 1 CPU x 1 epoch each, the same model, batch size and augmentation. Each worker
reports its peak RSS, the memory it gained from the training function's start to its first
batch (what the data cost: imports and the model are already there at the start) and the time
to that first batch.

    python benchmarks/data_scale.py            # about 5 minutes on 2 cores
    python benchmarks/data_scale.py --images 2000 --size 64   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _write_class(args) -> int:
    import numpy as np
    from PIL import Image

    folder, label, count, size, seed = args
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + label)
    written = 0
    for i in range(count):
        f = folder / f"{i:06d}.jpg"
        if f.exists():
            continue
        img = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
        r, c = divmod(label % 4, 2)
        h = size // 2
        img[r * h:(r + 1) * h, c * h:(c + 1) * h, label % 3] += 120
        Image.fromarray(img).save(f, quality=90)
        written += 1
    return written


def make_folder(root: Path, images: int, size: int, classes: int = 4) -> Path:
    per = -(-images // classes)
    jobs = [(root / f"class{k}", k, per, size, 0) for k in range(classes)]
    start = time.monotonic()
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        written = sum(pool.map(_write_class, jobs))
    if written:
        print(f"wrote {written} images under {root} in {time.monotonic() - start:.0f} s",
              flush=True)
    return root


def old_loop(config: dict) -> None:
    """The loading this project had until now: the whole train split decoded into every
    worker (ImageDataset(preload=True)), a DistributedSampler over all rows."""
    import ray.train
    import torch
    from torch.utils.data import DataLoader, DistributedSampler

    from components.augment import build_train_transform, eval_preprocessing
    from components.data.dataset import ImageDataset
    from components.models import build_model
    from components.training.loaders import FirstBatchClock, rss_mb
    from components.training.ranks import peak_rss_mb

    started, started_rss = time.monotonic(), rss_mb()
    job = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    prep = eval_preprocessing(job.data, job.model)
    size, channels = job.data.image_size, job.data.channels
    ds = ImageDataset(*job.train_rows, channels, size, build_train_transform(
        job.augment.train, size, channels, prep["mean"], prep["std"], seed=job.seed + rank),
        cache=True)
    for i in range(len(ds)):  # preload=True: everything decoded before the first batch
        ds.image(i)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = FirstBatchClock(DataLoader(ds, batch_size=job.train.batch_size, sampler=sampler,
                                        drop_last=True), started, started_rss)
    model = ray.train.torch.prepare_model(build_model(job.model, job.num_classes, channels))
    opt = torch.optim.Adam(model.parameters(), job.train.lr)
    from components.training.loop import train_one_epoch

    train_one_epoch(model, loader, opt, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    metrics = {"peak_rss_mb": peak_rss_mb(torch.device("cpu")),
               "time_to_first_batch_s": loader.first_batch_s,
               "data_rss_mb": loader.data_rss_mb, "epoch": 1}
    # Train V2 keeps a run's metrics with its checkpoint: rank 0 attaches an empty one.
    with tempfile.TemporaryDirectory() as d:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                         if rank == 0 else None)


def new_loop(config: dict) -> None:
    from components.training.worker import train_loop_per_worker

    train_loop_per_worker(config)


def run_one(loop, job, storage: str, name: str) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    start = time.monotonic()
    result = TorchTrainer(loop, train_loop_config={"job": job},
                          scaling_config=ScalingConfig(num_workers=2,
                                                       resources_per_worker={"CPU": 1}),
                          run_config=RunConfig(name=name, storage_path=storage)).fit()
    if result.error:
        raise result.error
    m = result.metrics
    return {"peak_rss_mb": round(m["peak_rss_mb"], 1),
            "data_rss_mb": round(m["data_rss_mb"], 1),
            "time_to_first_batch_s": round(m["time_to_first_batch_s"], 2),
            "images_decoded_rank0": m.get("images_decoded"),
            "run_wall_s": round(time.monotonic() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/data_scale.json")
    args = ap.parse_args()

    import ray

    from components.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
    from components.data import index_images, split_dataset, validate_images
    from components.data.dataset import decoded_bytes, use_cache
    from components.data.validate import DecodeTarget
    from components.training.spec import TrainJob
    from pipelines.console import Progress

    shown = logging.getLogger("data_scale")   # Progress logs its lines: here, on stdout
    shown.addHandler(logging.StreamHandler(sys.stdout))
    shown.setLevel(logging.INFO)
    root = Path(args.data_dir or Path.home() / ".cache" / "visiontune" /
                f"bench-{args.images}-{args.size}")
    make_folder(root, args.images, args.size)
    start = time.monotonic()
    checked = validate_images(index_images(root), progress=Progress("checked", log=shown))
    validate_s = time.monotonic() - start
    manifest = split_dataset(checked, 0.1, 0.1, 0)
    train_rows = manifest.subset("train")
    n_train = len(train_rows[0])
    split_mb = decoded_bytes(n_train, 3, args.size) / 2**20
    data = DataConfig(path=str(root), image_size=args.size, channels=3)
    per_worker = (n_train + len(manifest.subset("val")[0])) // 2
    caches = use_cache(data.cache, per_worker, 3, args.size, data.cache_max_mb)
    print(f"{len(checked.index)} images ({n_train} train, decoded {split_mb:.0f} MiB); "
          f"checked in {validate_s:.0f} s; new loading caches: {caches}", flush=True)
    job = TrainJob(data=data, augment=AugmentConfig(train=[]),
                   model=ModelConfig(name="cnn"), train=TrainConfig(
                       epochs=1, num_workers=2, batch_size=64, patience=0, scheduler="none"),
                   average="macro", seed=0, train_rows=train_rows,
                   val_rows=manifest.subset("val"), num_classes=len(manifest.classes))
    job.model.cnn.channels = [8, 16]
    results = {}
    ray.init(num_cpus=2, configure_logging=False)  # the dashboard: Train's PG cleaner
    try:
        with tempfile.TemporaryDirectory() as storage:
            # The sweep's store, as the validate step builds it (its cost is the decode pass
            # the other two pay in every trial; it is timed apart, not in the runs below).
            start = time.monotonic()
            store = validate_images(index_images(root), decode_to=DecodeTarget(
                storage, args.size, 3), decoding=Progress("decoded", log=shown)).decoded
            store_s = time.monotonic() - start
            print(f"decoded store built in {store_s:.0f} s: {store.location}", flush=True)
            with_store = dataclasses.replace(job, decoded=(store,))
            for name, loop, j in (("old: whole split decoded in every worker", old_loop, job),
                                  ("shard: own shard, decoded as read", new_loop, job),
                                  ("store: own rows from the decoded store", new_loop,
                                   with_store)):
                print(f"running {name} ...", flush=True)
                results[name] = run_one(loop, j, storage, name.split(":")[0])
                print(f"  {results[name]}", flush=True)
    finally:
        ray.shutdown()
    report = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "images": len(checked.index), "image_size": args.size, "train_images": n_train,
        "decoded_train_split_mib": round(split_mb, 1), "validate_s": round(validate_s, 1),
        "store_build_s": round(store_s, 1),
        "workers": 2, "epochs": 1, "results": results,
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\ndecoded train split: {split_mb:.0f} MiB; a quarter: {split_mb / 4:.0f} MiB")
    print(f"{'loading':42} {'peak RSS/worker':>15} {'data RSS/worker':>15} "
          f"{'share of split':>14} {'first batch':>11} {'decoded by rank 0':>17}")
    for name, r in results.items():
        print(f"{name:42} {r['peak_rss_mb']:>11.0f} MiB {r['data_rss_mb']:>11.0f} MiB "
              f"{r['data_rss_mb'] / split_mb:>14.2f} {r['time_to_first_batch_s']:>9.1f} s "
              f"{r['images_decoded_rank0'] if r['images_decoded_rank0'] is not None else '-':>17}")
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
