"""Build the Ray Train `TorchTrainer` for one training run. Tuning calls this same builder
for every trial, so a trial and a single training run can never drift apart."""

from __future__ import annotations

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from components.training.spec import TrainJob
from components.training.worker import train_loop_per_worker


def worker_resources(num_cpus: float, use_gpu: bool, extra: dict | None = None) -> dict:
    """What one Train worker asks Ray for: CPU (+1 GPU with use_gpu), then `extra` on top."""
    res = {"CPU": float(num_cpus)}
    if use_gpu:
        res["GPU"] = 1.0
    for k, v in (extra or {}).items():
        res[str(k)] = float(v)
    return {k: v for k, v in res.items() if v > 0}


def build_trainer(job: TrainJob, *, name: str, storage_path: str,
                  callbacks: list | None = None) -> TorchTrainer:
    tc = job.train
    resources = worker_resources(tc.cpus_per_worker, tc.use_gpu, tc.resources_per_worker)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            # A stable name per trial + the same storage path: a retried trial resumes this
            # Train run from its latest checkpoint instead of starting over.
            name=name,
            storage_path=storage_path,
            # Restart the worker group from the last checkpoint after a worker dies; the
            # default (-1, retry forever) would hang a run whose workers can never start.
            failure_config=FailureConfig(max_failures=tc.max_failures, controller_failure_limit=2),
            # The latest checkpoint carries both the resume state and the best weights.
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=callbacks or [],
        ),
    )
