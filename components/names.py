"""The names the configuration accepts for things built with torch, without importing torch:
the command line validates a config and answers `--help` in well under a second. Each module
that builds the things checks its registry against these lists (tests/unit/test_config.py)."""

ACTIVATION_NAMES = ("relu", "leaky_relu", "prelu", "elu", "gelu", "tanh", "sigmoid")
POOLING_NAMES = ("max", "avg")
INITIALIZER_NAMES = ("default", "zeros", "uniform", "normal", "xavier_uniform", "xavier_normal",
                     "kaiming_uniform", "kaiming_normal", "orthogonal")
OPTIMIZER_NAMES = ("sgd", "sgd_momentum", "nesterov", "adam", "adamw", "nadam", "rmsprop",
                   "adagrad", "adadelta")
SCHEDULER_NAMES = ("none", "step", "cosine", "onecycle", "plateau")
