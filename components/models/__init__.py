"""Model builders: the small CNN and torchvision transfer-learning backbones."""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from components.models.cnn import ACTIVATIONS, SmallCNN
from components.models.initializers import INITIALIZER_NAMES, apply_initializer
from components.models.transfer import (
    NoClassifierHeadError,
    TransferModel,
    WeightsNotFoundError,
    backbone_names,
    build_transfer_model,
)

if TYPE_CHECKING:  # components.config imports this package: no runtime import
    from components.config import ModelConfig

__all__ = [
    "ACTIVATIONS", "INITIALIZER_NAMES", "NoClassifierHeadError", "SmallCNN", "TransferModel",
    "WeightsNotFoundError", "apply_initializer", "backbone_names", "build_model",
    "check_model_input",
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


# ----------------------------------------------------------------------------- input check

# (model.name, image_size, channels, num_classes, cnn shape) -> (problem or None, module names)
_INPUT_CHECKS: dict[tuple, tuple[str | None, tuple[str, ...]]] = {}


def _forward_problem(model: nn.Module, channels: int, size: int,
                     num_classes: int) -> str | None:
    """What goes wrong in one eval and one training forward of a zero batch, or None."""
    x = torch.zeros(2, channels, size, size)
    with torch.no_grad():
        for training in (False, True):
            model.train(training)
            try:
                out = model(x)
            except Exception as e:  # any failure here is one every trial would hit
                lines = str(e).strip().splitlines() or [type(e).__name__]
                return lines[0].strip()
            if not isinstance(out, torch.Tensor):
                return (f"it returns {type(out).__name__} in "
                        f"{'training' if training else 'eval'} mode, not logits")
            if tuple(out.shape) != (2, num_classes):
                return (f"its output has shape {tuple(out.shape)}, not (batch, {num_classes}): "
                        "its last nn.Linear is not the classification head")
    return None


def _input_problem(model_cfg, image_size: int, channels: int,
                   num_classes: int) -> tuple[str | None, tuple[str, ...]]:
    """(what stops this model on these images or None, its module names)."""
    where = f"model.name={model_cfg.name}"
    # Never load weights for this: only shapes matter, and nothing may be downloaded.
    cfg = dataclasses.replace(model_cfg, pretrained=False, weights_path=None,
                              initializer="default")
    try:
        model = build_model(cfg, num_classes, channels)
    except NoClassifierHeadError:
        return f"{where} has no replaceable classification head (no final nn.Linear)", ()
    except ValueError as e:
        return f"{where}: {e}", ()
    modules = tuple(n for n, _ in model.named_modules())
    problem = _forward_problem(model, channels, image_size, num_classes)
    if problem is None:
        return None, modules
    return (f"{where} cannot take data.image_size={image_size} images (data.channels="
            f"{channels}): {problem}; use a larger data.image_size or another model"), modules


def check_model_input(model_cfg: ModelConfig, image_size: int, channels: int,
                      num_classes: int = 2) -> None:
    """Refuse, with a one-line `ConfigError`, a model (a `ModelConfig`) that can never run on
    `channels` x `image_size` x `image_size` images: a backbone that shrinks them to nothing or
    wants a fixed size, one without a replaceable nn.Linear head, a freeze_stage it lacks.

    The model is built without pretrained weights (nothing is loaded or downloaded) and runs
    one forward pass of a zero batch in eval and in training mode. Results are cached per model
    shape and image size: the search space runs this for every combination it can launch."""
    from components.config import ConfigError  # lazy: components.config imports this package

    cnn = model_cfg.cnn
    key = (model_cfg.name, image_size, channels, num_classes,
           (tuple(cnn.channels), cnn.kernel_size, cnn.batch_norm, cnn.pooling)
           if model_cfg.name == "cnn" else None)
    if key not in _INPUT_CHECKS:
        with warnings.catch_warnings():
            # googlenet/inception_v3 warn about their init on every build; a trial warns anyway.
            warnings.simplefilter("ignore", FutureWarning)
            _INPUT_CHECKS[key] = _input_problem(model_cfg, image_size, channels, num_classes)
    problem, modules = _INPUT_CHECKS[key]
    if problem:
        raise ConfigError(problem)
    stage = model_cfg.freeze_stage
    if model_cfg.name != "cnn" and model_cfg.freeze == "stage" and f"net.{stage}" not in modules:
        top = [n.removeprefix("net.") for n in modules if n.count(".") == 1]
        raise ConfigError(f"model.freeze_stage={stage} is not a module of model.name="
                          f"{model_cfg.name}; its top-level stages: {', '.join(top)}")
