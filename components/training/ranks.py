"""What the ranks of a data-parallel run do together: gather predictions, average the loss,
agree on BatchNorm statistics, find the largest memory peak. With one rank (a trial training
in its Tune process, no process group) each is the plain single-process computation."""

from __future__ import annotations

import resource

import torch
import torch.distributed as dist
from torch import nn

from components.training.loop import predict
from components.training.metrics import classification_metrics


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(obj):
    if not _distributed():
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


def all_reduce_mean(total: float, count: int, device) -> float:
    t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t)
    return (t[0] / t[1].clamp(min=1)).item()


def state_dict(model: nn.Module) -> dict:
    m = model.module if hasattr(model, "module") else model
    return {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}


def sync_buffers_from_rank0(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts rank 0's buffers at the start of each training forward, so after an epoch's
    last batch every rank holds statistics updated by its own last batch. Rank 0 saves the
    checkpoint: validating before this sync would score a model no one saved. One broadcast
    per dtype and device: cheap next to an epoch, the same on gloo (CPU) and NCCL (GPU)."""
    if not _distributed():
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


def peak_rss_mb(device) -> float:
    """The largest peak resident memory of any rank's process, in MiB."""
    mine = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    t = torch.tensor([mine], dtype=torch.float64, device=device)
    if _distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()
