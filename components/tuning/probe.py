"""What one epoch of each model family costs on this cluster, measured before a budgeted sweep.

As many probes run at once as trials will (`ResourcePlan.concurrent_trials`), each a Ray task
holding one trial's resources, so cores shared between trials are shared while measuring.
A probe builds each family's model and optimizer as a trial does and times a few training
steps and one validation pass on batches of the sweep's shape, the training augmentation on
images of its size, and a checkpoint write; an epoch is then those times scaled to the split.
Timing a few batches costs seconds; timing a first epoch would cost a ResNet-18 epoch per
family (benchmarks/budget.py compares the estimate with the epochs the sweep then ran).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time

from components.tuning.budget import FamilyCost

WARMUP_STEPS, TIMED_STEPS = 1, 3
# A trial's fixed cost besides building its model: its MLflow child run, the data loaders
# over the decoded store and the first batch (measured in benchmarks/budget.py).
TRIAL_START_S = 2.0


def _time_family(job, name: str, threads: int) -> dict[str, float]:
    import numpy as np
    import torch

    from components.augment import build_train_transform, eval_preprocessing
    from components.models import build_model
    from components.training.loop import predict, train_one_epoch
    from components.training.optim import build_optimizer

    torch.set_num_threads(max(1, threads))
    device = torch.device("cuda", 0) if job.train.use_gpu else torch.device("cpu")
    model_cfg = dataclasses.replace(job.model, name=name, pretrained=False)
    began = time.perf_counter()
    model = build_model(model_cfg, job.num_classes, job.data.channels).to(device)
    build_s = time.perf_counter() - began
    tc, size, channels = job.train, job.data.image_size, job.data.channels
    optimizer = build_optimizer(tc.optimizer, model.parameters(), tc.lr, tc.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        return (torch.randn(n, channels, size, size, generator=gen),
                torch.randint(0, job.num_classes, (n,), generator=gen), torch.arange(n))

    amp = tc.amp and device.type == "cuda"
    train_one_epoch(model, [batch(tc.batch_size)] * WARMUP_STEPS, optimizer, loss_fn, device,
                    amp=amp)
    began = time.perf_counter()
    train_one_epoch(model, [batch(tc.batch_size)] * TIMED_STEPS, optimizer, loss_fn, device,
                    amp=amp)
    step_s = (time.perf_counter() - began) / TIMED_STEPS
    eval_batch = max(tc.batch_size, 256)
    began = time.perf_counter()
    predict(model, [batch(eval_batch)], device, amp=amp)
    eval_s = time.perf_counter() - began
    prep = eval_preprocessing(job.data, model_cfg)
    transform = build_train_transform(job.augment.train, size, channels, prep["mean"],
                                      prep["std"], seed=0)
    image = np.random.default_rng(0).integers(0, 255, (size, size, channels), dtype=np.uint8)
    began = time.perf_counter()
    for _ in range(tc.batch_size):
        transform(image=image)
    augment_s = (time.perf_counter() - began) / tc.batch_size
    with tempfile.TemporaryFile() as f:
        began = time.perf_counter()
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, f)
        save_s = time.perf_counter() - began
    return {"build_s": build_s, "step_s": step_s, "eval_s": eval_s / eval_batch,
            "augment_s": augment_s, "save_s": save_s}


def _probe_all(job, families: list[str], threads: int) -> dict[str, dict[str, float]]:
    return {name: _time_family(job, name, threads) for name in families}


def epoch_cost(timing: dict[str, float], train_images: int, val_images: int,
               batch_size: int) -> FamilyCost:
    """One epoch from the probe's timings: the split's steps, its validation images, the
    training augmentation per image and the epoch's checkpoint."""
    steps = max(1, train_images // batch_size) if train_images > batch_size else 1
    epoch = (steps * timing["step_s"] + val_images * timing["eval_s"]
             + train_images * timing["augment_s"] + timing["save_s"])
    return FamilyCost(epoch_s=epoch, start_s=TRIAL_START_S + timing["build_s"])


def probe_costs(job, families: list[str], resources: dict[str, float],
                at_once: int) -> dict[str, FamilyCost]:
    """Each family's `FamilyCost` on the connected Ray cluster (module docstring)."""
    import ray

    task = ray.remote(_probe_all).options(
        num_cpus=resources.get("CPU", 0), num_gpus=resources.get("GPU", 0),
        resources={k: v for k, v in resources.items() if k not in ("CPU", "GPU")} or None)
    threads = max(1, int(resources.get("CPU", 1)))
    n_train, n_val = len(job.train_rows[0]), len(job.val_rows[0])
    # the probe needs the shapes, not the rows
    job = dataclasses.replace(job, train_rows=([], []), val_rows=([], []), decoded=(),
                              group_keys={})
    timings = ray.get([task.remote(job, families, threads) for _ in range(max(1, at_once))])
    out = {}
    for name in families:
        # the median probe: one that started late ran partly alone
        merged = {k: statistics.median(t[name][k] for t in timings)
                  for k in timings[0][name]}
        out[name] = epoch_cost(merged, n_train, n_val, job.train.batch_size)
    return out

