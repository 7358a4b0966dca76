"""Where a training loop runs: a Ray Train worker (one rank of a `TorchTrainer`, DDP) or the
Ray Tune trial itself (one process, no process group). The loop in
`components.training.worker` asks its session for its rank, its device, the checkpoint to
resume from, and where to report; nothing else in it knows which of the two it runs in.

Why two: a trial that is not data-parallel gains nothing from a worker group but pays for it
(Ray Train's controller and worker processes start per trial, and each imports torch,
albumentations and MLflow again). In the trial itself, the reused Tune actor imports them once.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class TrainSession(Protocol):
    rank: int
    world: int
    name: str            # the trial (or Train run) name, for timing marks
    device: torch.device

    def checkpoint(self):
        """The checkpoint to resume from (a Ray `Checkpoint`), or None for a fresh start."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model on this session's device (wrapped in DDP where there are ranks)."""

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        """One epoch's metrics, with the checkpoint written to `checkpoint_dir` (rank 0)."""

    def report_again(self, metrics: dict, checkpoint) -> None:
        """The final metrics of a run that had ended, with its stored checkpoint."""


class RayTrainSession:
    """One rank of a Ray Train worker group (`TorchTrainer`)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.name = ctx.get_experiment_name()
        self.device = ray.train.torch.get_device()

    def checkpoint(self):
        import ray.train

        return ray.train.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=None if checkpoint_dir is None
                         else ray.train.Checkpoint.from_directory(checkpoint_dir))

    def report_again(self, metrics: dict, checkpoint) -> None:
        """Every rank waits on one report; rank 0 re-attaches the checkpoint: Train copies the
        stored directory to a new one (not deleted as a local source), then drops the old."""
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint if self.rank == 0 else None,
                         delete_local_checkpoint_after_upload=False)


class TuneTrialSession:
    """The Tune trial's own process: rank 0 of 1, on the trial's CPUs (as torch threads) or on
    its GPU. Checkpoints go to Tune, which hands the latest back when it retries the trial
    (`tune.FailureConfig`) or resumes the sweep."""

    rank, world = 0, 1

    def __init__(self, cpus: float, use_gpu: bool):
        from ray import tune

        self.name = tune.get_context().get_trial_id()
        # Ray sets OMP_NUM_THREADS once per process; a reused actor may get a trial of another
        # size, and a trial given more CPUs than workers uses them as threads.
        torch.set_num_threads(max(1, int(cpus)))
        # Ray limits CUDA_VISIBLE_DEVICES to the trial's GPU: it is device 0 here.
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")

    def checkpoint(self):
        from ray import tune

        return tune.get_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=None if checkpoint_dir is None
                    else tune.Checkpoint.from_directory(checkpoint_dir))

    def report_again(self, metrics: dict, checkpoint) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=checkpoint)
