"""Weight initializers by name, applied to every conv/linear layer; biases are zeroed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from components import names

# Each takes the weight tensor in place. Gains follow torch's recommendation for ReLU nets,
# which is what the CNN uses by default; they are a course's standard choices, not tuned values.
INITIALIZERS: dict[str, Callable[[torch.Tensor], object]] = {
    "zeros": nn.init.zeros_,
    "uniform": lambda w: nn.init.uniform_(w, -0.05, 0.05),
    "normal": lambda w: nn.init.normal_(w, 0.0, 0.02),
    "xavier_uniform": nn.init.xavier_uniform_,
    "xavier_normal": nn.init.xavier_normal_,
    "kaiming_uniform": lambda w: nn.init.kaiming_uniform_(w, nonlinearity="relu"),
    "kaiming_normal": lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"),
    "orthogonal": nn.init.orthogonal_,
}

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def apply_initializer(module: nn.Module, name: str) -> nn.Module:
    """Initialize every conv/linear weight under `module` with `name` and zero their biases.

    `default` keeps PyTorch's own initialization (what a pretrained backbone or a user wants).
    """
    if name == "default":
        return module
    try:
        init = INITIALIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown initializer {name!r}; valid: {', '.join(['default', *INITIALIZERS])}"
        ) from None
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, _LAYERS):
                init(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
    return module


INITIALIZER_NAMES = ["default", *INITIALIZERS]
assert tuple(INITIALIZER_NAMES) == names.INITIALIZER_NAMES, "components/names.py is out of date"
