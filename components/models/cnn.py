"""A small configurable CNN: conv blocks (conv, optional batch norm, activation, pooling)."""

from __future__ import annotations

from torch import nn

from components import names

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "prelu": nn.PReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}

POOLINGS = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}
assert (tuple(ACTIVATIONS), tuple(POOLINGS)) == (names.ACTIVATION_NAMES, names.POOLING_NAMES), \
    "components/names.py is out of date"


def make_activation(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {', '.join(ACTIVATIONS)}") from None


class SmallCNN(nn.Module):
    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        channels: tuple[int, ...] = (32, 64),
        kernel_size: int = 3,
        batch_norm: bool = True,
        activation: str = "relu",
        pooling: str = "max",
        dropout: float = 0.0,
        block_dropout: float = 0.0,
    ):
        super().__init__()
        if not channels:
            raise ValueError("the CNN needs at least one conv block (model.cnn.channels)")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(POOLINGS)}")
        layers: list[nn.Module] = []
        prev = in_channels
        for width in channels:
            # With batch norm the conv bias is redundant (BN re-centres), so drop it.
            layers.append(nn.Conv2d(prev, width, kernel_size, padding=kernel_size // 2,
                                    bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(make_activation(activation))
            layers.append(POOLINGS[pooling](2, ceil_mode=True))
            if block_dropout > 0:
                layers.append(nn.Dropout2d(block_dropout))
            prev = width
        self.features = nn.Sequential(*layers)
        # A fixed 4x4 grid keeps some spatial layout while making the head independent of the
        # input size, so one config works for 8x8 digits and 224x224 photos alike.
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(prev * 16, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
