"""Freezing, gradual unfreezing and a smaller backbone learning rate for transfer models.

One mechanism serves DDP: parameters frozen for the whole run get requires_grad=False before
the model is wrapped (DDP then ignores them and no gradient is computed); parameters that
unfreeze later stay trainable but sit in an optimizer group with lr 0 until their epoch,
because DDP cannot start syncing a parameter that was frozen when it was wrapped.
"""

from __future__ import annotations

from torch import nn

from components.models.transfer import TransferModel

FROZEN_GROUP = "frozen_until_unfreeze"


def frozen_parameter_names(model: TransferModel, freeze: str, stage: str | None) -> set[str]:
    """Names (as in model.named_parameters()) of the parameters `freeze` covers."""
    if freeze == "none":
        return set()
    head = {id(p) for p in model.head_parameters()}
    backbone = [(n, p) for n, p in model.named_parameters() if id(p) not in head]
    if freeze == "backbone":
        return {n for n, _ in backbone}
    if freeze != "stage":
        raise ValueError(f"unknown freeze strategy {freeze!r}; valid: none, backbone, stage")
    modules = dict(model.net.named_modules())
    if stage not in modules or stage == "":
        top = [n for n, _ in model.net.named_children()]
        raise ValueError(f"model.freeze_stage={stage!r} is not a module of this backbone; "
                         f"top-level stages: {', '.join(top)}")
    # Everything up to and including the stage, in the network's parameter order.
    prefix = f"net.{stage}."
    names = [n for n, _ in backbone]
    last = max((i for i, n in enumerate(names) if n.startswith(prefix)), default=-1)
    return set(names[: last + 1])


def build_param_groups(model: nn.Module, lr: float, *, freeze: str = "none",
                       stage: str | None = None, unfreeze_epoch: int | None = None,
                       backbone_lr_mult: float = 1.0) -> list[dict]:
    """Optimizer parameter groups. The head trains at `lr`, the backbone at
    `lr * backbone_lr_mult`; frozen parameters either leave the optimizer (frozen for good) or
    wait in an lr-0 group that `unfreeze` opens at `unfreeze_epoch`."""
    if not isinstance(model, TransferModel):
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr,
                 "name": "all"}]
    frozen = frozen_parameter_names(model, freeze, stage)
    head_ids = {id(p) for p in model.head_parameters()}
    head, backbone, waiting = [], [], []
    for name, p in model.named_parameters():
        if id(p) in head_ids:
            head.append(p)
        elif name in frozen:
            if unfreeze_epoch is None:
                p.requires_grad_(False)
            else:
                waiting.append(p)
        else:
            backbone.append(p)
    groups = [{"params": head, "lr": lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"})
    if waiting:
        groups.append({"params": waiting, "lr": 0.0, "name": FROZEN_GROUP,
                       "unfreeze_lr": lr * backbone_lr_mult})
    return groups


def unfreeze(optimizer, scheduler=None) -> bool:
    """Give the waiting group its learning rate (and tell the scheduler, whose base rates
    would otherwise pull it back to 0). Returns whether anything was unfrozen."""
    changed = False
    for i, group in enumerate(optimizer.param_groups):
        if group.get("name") != FROZEN_GROUP or group["lr"] > 0:
            continue
        lr = group["unfreeze_lr"]
        group["lr"] = group["initial_lr"] = lr
        if "max_lr" in group:  # OneCycleLR keeps its own per-group bounds
            group["max_lr"] = lr
            group["min_lr"] = lr / 1e4
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs[i] = lr
        if scheduler is not None and hasattr(scheduler, "min_lrs"):  # ReduceLROnPlateau
            scheduler.min_lrs[i] = 0.0
        changed = True
    return changed
