"""The epoch loop: plain torch, no Ray and no MLflow, so it runs in a unit test in
milliseconds and the Ray worker adapter stays thin."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module, device: torch.device, *, scaler=None,
                    amp: bool = False, batch_scheduler=None, grad_clip: float | None = None,
                    l1: float = 0.0) -> tuple[float, int]:
    """One pass over `loader`; returns (sum of per-sample losses, number of samples) so the
    caller can average across DDP ranks exactly."""
    model.train()
    total, count = 0.0, 0
    for x, y, _ in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            loss = loss_fn(model(x), y)
            if l1 > 0:
                loss = loss + l1 * sum(p.abs().sum() for p in model.parameters() if p.requires_grad)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
        if batch_scheduler is not None:
            batch_scheduler.step()
        total += loss.item() * len(y)
        count += len(y)
    return total, count


def track_best(state: dict, epoch: int, val_f1: float, val_loss: float,
               patience: int) -> tuple[bool, bool]:
    """Update the best-epoch record in `state` (best_val_f1, best_val_loss, best_epoch,
    epochs_without_gain, epoch, stopped_early); returns (improved, stop). Only a strictly
    higher val F1 counts as a gain; `patience` epochs without one stop training (0 = never)."""
    improved = val_f1 > state["best_val_f1"]
    if improved:
        state.update(best_val_f1=val_f1, best_val_loss=val_loss, best_epoch=epoch,
                     epochs_without_gain=0)
    else:
        state["epochs_without_gain"] += 1
    state["epoch"] = epoch
    # Recorded so that a run resumed from this state knows it is over (see finished_metrics).
    state["stopped_early"] = patience > 0 and state["epochs_without_gain"] >= patience
    return improved, state["stopped_early"]


def finished_metrics(state: dict, epochs: int) -> dict | None:
    """The metrics to report again when training resumes from a saved `state` that needs no
    more epochs (it stopped early, or ran all `epochs`); None when training must go on.

    A run resumed after it ended must still report once: its caller (Tune) may not have
    received the last report before the driver died. The state's `last_metrics` are that
    report; a state saved without them yields its best-epoch record."""
    if not (state.get("stopped_early") or state["epoch"] >= epochs):
        return None
    if state.get("last_metrics"):
        return dict(state["last_metrics"])
    return {"epoch": state["epoch"], "best_val_f1": state["best_val_f1"],
            "best_val_loss": state["best_val_loss"], "best_epoch": state["best_epoch"],
            "early_stopped": int(bool(state.get("stopped_early")))}


@torch.no_grad()
def predict(model: nn.Module, loader, device: torch.device, *, amp: bool = False):
    """Run `model` over `loader`; returns (indices, labels, probabilities, per-sample losses) as
    CPU tensors. Uses cross-entropy without smoothing: val_loss must not depend on the
    training-time label smoothing of a trial."""
    model.eval()
    idx, labels, probs, losses = [], [], [], []
    for x, y, i in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        losses.append(nn.functional.cross_entropy(logits, y, reduction="none").cpu())
        probs.append(logits.softmax(dim=1).cpu())
        labels.append(y.cpu())
        idx.append(i.cpu() if torch.is_tensor(i) else torch.as_tensor(i))
    if not idx:
        empty = torch.empty(0)
        return empty.long(), empty.long(), empty, empty
    return torch.cat(idx), torch.cat(labels), torch.cat(probs), torch.cat(losses)
