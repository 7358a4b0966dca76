"""The names the configuration accepts for things built with torch, without importing torch:
the command line validates a config and answers `--help` in well under a second. Each module
that builds the things checks its registry against these lists (tests/unit/test_config.py).
The torchvision backbones' names are listed on first use (that imports torchvision). And the
ids this project gives what it starts (pipeline runs, Ray jobs)."""

import time
import uuid

ACTIVATION_NAMES = ("relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "sigmoid")
POOLING_NAMES = ("max", "avg")
INITIALIZER_NAMES = ("default", "zeros", "uniform", "normal", "xavier_uniform", "xavier_normal",
                     "kaiming_uniform", "kaiming_normal", "orthogonal")
OPTIMIZER_NAMES = ("sgd", "sgd_momentum", "nesterov", "adam", "adamw", "nadam", "rmsprop",
                   "adagrad", "adadelta")
SCHEDULER_NAMES = ("none", "step", "cosine", "onecycle", "plateau")


def new_id(prefix: str) -> str:
    """`<prefix>-20261204-153012-1a2b3c`: sorts by start time, unique across machines."""
    return time.strftime(f"{prefix}-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


def backbone_names() -> list[str]:
    """torchvision's classification models by name: the backbones `model.name` may take
    (torchvision is imported here, on first use, not with this module)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))
