"""Model builders: the small CNN and torchvision transfer-learning backbones."""

from __future__ import annotations

from torch import nn

from components.models.cnn import ACTIVATIONS, SmallCNN
from components.models.initializers import INITIALIZER_NAMES, apply_initializer
from components.models.transfer import (
    TransferModel,
    WeightsNotFoundError,
    backbone_names,
    build_transfer_model,
)

__all__ = [
    "ACTIVATIONS", "INITIALIZER_NAMES", "SmallCNN", "TransferModel", "WeightsNotFoundError",
    "apply_initializer", "backbone_names", "build_model",
]


def build_model(model_cfg, num_classes: int, in_channels: int) -> nn.Module:
    """Build the model a `ModelConfig` describes: `cnn` or any torchvision backbone name.
    Freezing is the optimizer's business (`components.models.freezing.build_param_groups`)."""
    if model_cfg.name == "cnn":
        cnn = model_cfg.cnn
        model = SmallCNN(
            num_classes, in_channels, tuple(cnn.channels), cnn.kernel_size, cnn.batch_norm,
            model_cfg.activation, cnn.pooling, model_cfg.dropout, cnn.block_dropout,
        )
        return apply_initializer(model, model_cfg.initializer)
    return build_transfer_model(
        model_cfg.name, num_classes, in_channels, model_cfg.dropout, model_cfg.initializer,
        model_cfg.pretrained, model_cfg.weights_path,
    )
