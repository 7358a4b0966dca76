"""Optimizers and learning-rate schedulers by name (pure torch)."""

from __future__ import annotations

import torch

from components import names

# name -> (torch class, fixed kwargs that define the variant)
_OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {}),
    "sgd_momentum": (torch.optim.SGD, {"momentum": None}),
    "nesterov": (torch.optim.SGD, {"momentum": None, "nesterov": True}),
    "adam": (torch.optim.Adam, {"betas": None, "eps": None}),
    "adamw": (torch.optim.AdamW, {"betas": None, "eps": None}),
    "nadam": (torch.optim.NAdam, {"betas": None, "eps": None}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": None, "eps": None}),
    "adagrad": (torch.optim.Adagrad, {"eps": None}),
    "adadelta": (torch.optim.Adadelta, {"eps": None}),
}
OPTIMIZER_NAMES = list(_OPTIMIZERS)
SCHEDULER_NAMES = list(names.SCHEDULER_NAMES)
assert tuple(OPTIMIZER_NAMES) == names.OPTIMIZER_NAMES, "components/names.py is out of date"


def build_optimizer(name: str, param_groups, lr: float, weight_decay: float = 0.0,
                    momentum: float = 0.9, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.Optimizer:
    """`param_groups` is an iterable of parameters or of dicts (e.g. a backbone group with
    its own lr); hyperparameters an optimizer does not take are ignored, not errors, so one
    search space can cross optimizers."""
    try:
        cls, variant = _OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(_OPTIMIZERS)}") from None
    values = {"momentum": momentum, "betas": tuple(betas), "eps": eps}
    kwargs = {k: (values[k] if v is None else v) for k, v in variant.items()}
    # rmsprop's momentum defaults to 0 in torch; a course's rmsprop is the plain one.
    if name == "rmsprop":
        kwargs["momentum"] = 0.0
    return cls(param_groups, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, epochs: int,
                    steps_per_epoch: int, step_size: int = 10, gamma: float = 0.1):
    """Returns (scheduler, when) with when in {"batch", "epoch", "plateau"} or (None, None)."""
    if name == "none":
        return None, None
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size, gamma), "epoch"
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1)), "epoch"
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, epochs=epochs, steps_per_epoch=max(steps_per_epoch, 1)
        ), "batch"
    if name == "plateau":
        # Driven by val_f1, so it must reduce when the metric stops going *up*.
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=gamma, patience=1), "plateau"
    raise ValueError(f"unknown scheduler {name!r}; valid: {', '.join(SCHEDULER_NAMES)}")
