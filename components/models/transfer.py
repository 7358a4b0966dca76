"""Transfer-learning models from torchvision's model registry, with a new classification head.

Pretrained weights come only from a local file or an already populated torch hub cache: a
pipeline on a cluster node without network must fail with a clear message, not hang on a download.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from components.errors import MissingPathError
from components.models.initializers import apply_initializer
from components.names import backbone_names


class WeightsNotFoundError(MissingPathError):
    """A backbone's pretrained weights are neither in the cache nor at model.weights_path."""


class NoClassifierHeadError(ValueError):
    """The backbone ends in no nn.Linear (squeezenet's classifier is a 1x1 convolution)."""


def _torchvision():
    """torchvision, imported when a backbone is asked for: importing it costs a Train worker
    about 2 s on 2 cores (its ops import torch._dynamo), which a CNN trial does not need."""
    import torchvision

    return torchvision


def hub_weights_path(arch: str) -> Path:
    """Where torch hub would cache the default ImageNet weights of `arch`."""
    weights = _torchvision().models.get_model_weights(arch).DEFAULT
    hub_dir = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub"
    return hub_dir / "checkpoints" / Path(weights.url).name


def pretrained_weights_file(arch: str, weights_path: str | None) -> Path:
    """The local file the ImageNet weights of `arch` load from; a clear error if absent."""
    path = Path(weights_path).expanduser() if weights_path else hub_weights_path(arch)
    if not path.is_file():
        url = _torchvision().models.get_model_weights(arch).DEFAULT.url
        raise WeightsNotFoundError(
            f"pretrained weights for {arch} not found at {path}. visiontune never downloads at run "
            f"time: fetch {url} on a machine with network and either put it in the torch hub cache "
            f"($TORCH_HOME/hub/checkpoints/) or set model.weights_path=/path/to/file.pth "
            f"(or use model.pretrained=false)"
        )
    return path


def load_pretrained_state(arch: str, weights_path: str | None) -> dict[str, torch.Tensor]:
    return torch.load(pretrained_weights_file(arch, weights_path), map_location="cpu",
                      weights_only=True)


def _parent_and_name(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    parent_name, _, child = qualified.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise NoClassifierHeadError(
            f"{type(model).__name__} has no linear classifier layer to replace")
    return names[-1]


def _drop_aux_classifiers(net: nn.Module) -> None:
    """GoogLeNet and Inception v3 return (logits, aux logits...) in training mode; the epoch
    loop trains on logits alone, so the auxiliary heads would break the loss (and Inception's
    needs about 299 px images). Removed after the weights load, as torchvision itself does for
    pretrained models built with aux_logits=False."""
    if not getattr(net, "aux_logits", False):
        return
    net.aux_logits = False
    for name in ("aux1", "aux2", "AuxLogits"):
        if hasattr(net, name):
            setattr(net, name, None)


def _first_conv(model: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))


def _adapt_input_channels(model: nn.Module, in_channels: int) -> None:
    name = _first_conv(model)
    parent, child = _parent_and_name(model, name)
    old: nn.Conv2d = getattr(parent, child)
    if old.in_channels == in_channels:
        return
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    old.dilation, old.groups, old.bias is not None)
    with torch.no_grad():
        # Keep what the pretrained filters learned: a grey image is the mean of R, G and B.
        mean = old.weight.mean(dim=1, keepdim=True)
        new.weight.copy_(mean.repeat(1, in_channels, 1, 1) * (3 / in_channels))
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, child, new)


class TransferModel(nn.Module):
    """A torchvision backbone whose last linear layer is replaced by dropout + a new head.

    `head_name` tells the optimizer and the freezing logic which parameters are new.
    """

    def __init__(self, backbone: nn.Module, head_name: str):
        super().__init__()
        self.net = backbone
        self.head_name = head_name

    def forward(self, x):
        return self.net(x)

    def head_parameters(self):
        return self.net.get_submodule(self.head_name).parameters()

    def backbone_parameters(self):
        head = {id(p) for p in self.head_parameters()}
        return (p for p in self.net.parameters() if id(p) not in head)


def build_transfer_model(
    arch: str,
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    initializer: str = "default",
    pretrained: bool = False,
    weights_path: str | None = None,
) -> TransferModel:
    if arch not in backbone_names():
        raise ValueError(f"unknown backbone {arch!r}; torchvision has e.g. resnet18, resnet50, "
                         "vgg16, mobilenet_v3_small, efficientnet_b0")
    net = _torchvision().models.get_model(arch, weights=None)
    if pretrained:
        net.load_state_dict(load_pretrained_state(arch, weights_path))
    elif initializer != "default":
        # Trained from scratch, the whole network is the experiment's subject.
        apply_initializer(net, initializer)
    _drop_aux_classifiers(net)
    _adapt_input_channels(net, in_channels)
    head_name = _last_linear(net)
    parent, child = _parent_and_name(net, head_name)
    in_features = getattr(parent, child).in_features
    head = nn.Linear(in_features, num_classes)
    apply_initializer(head, initializer)
    setattr(parent, child, nn.Sequential(nn.Dropout(dropout), head))
    return TransferModel(net, head_name)
