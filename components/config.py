"""The typed configuration: one dataclass per section, validated before anything starts, and
the one place defaults live: `Config()` is what `visiontune run` runs with no options (conf/
holds only choices that differ from it). Components take the section they need (a
`TrainConfig`); only the CLI sees the whole `Config`. Validation turns a nested dict (YAML +
overrides) into these objects and fails with one line naming the key and the valid choices."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from components.credentials import URI_KEYS, check_no_credentials
from components.durations import parse_duration
from components.errors import ConfigError
from components.names import (
    ACTIVATION_NAMES,
    INITIALIZER_NAMES,
    OPTIMIZER_NAMES,
    POOLING_NAMES,
    SCHEDULER_NAMES,
    backbone_names,
)


def _choices(*values, doc: str = "") -> dict:
    return {"choices": values, "doc": doc}


def _check(fn, rule: str, doc: str = "") -> dict:
    return {"check": fn, "rule": rule, "doc": doc}


def _positive(doc=""):
    return _check(lambda v: v > 0, "must be > 0", doc)


def _is_duration(value) -> bool:
    with contextlib.suppress(ConfigError):
        return parse_duration(value) is not None
    return False


def _fraction(doc=""):
    return _check(lambda v: 0 <= v < 1, "must be in [0, 1)", doc)


def _model_names() -> tuple[str, ...]:
    # Called only when a name other than "cnn" is checked: listing torchvision's registry
    # imports every model module.
    return ("cnn", *backbone_names())


# The digits' augmentation: small shifts, zooms and rotations; a 6 never becomes a 9, so no flips.
DIGITS_AUGMENT = [{"name": "Affine", "scale": [0.9, 1.1], "translate_percent": [-0.1, 0.1],
                   "rotate": [-10, 10], "p": 0.8}]
# The default search (docs/performance.md, "The default search"): optimizer x initializer x
# model on the grid (8 trials), lr and dropout drawn at random, planned to fit search.budget.
DEFAULT_SPACE = {"train.optimizer": {"grid": ["sgd_momentum", "adam"]},
                 "model.initializer": {"grid": ["xavier_uniform", "kaiming_normal"]},
                 "model.name": {"grid": ["cnn", "resnet18"]},
                 "train.lr": {"loguniform": [0.0005, 0.005]},
                 "model.dropout": {"uniform": [0.0, 0.4]}}


@dataclass
class DataConfig:
    path: str | None = field(default=None, metadata={
        "doc": "image folder root/<class>/<files>, or a CSV manifest (path,label); "
               "empty = built-in digits dataset"})
    image_size: int = field(default=32, metadata=_positive("images are resized to this square"))
    channels: int = field(default=1, metadata=_choices(1, 3, doc="1 = grey, 3 = RGB"))
    on_bad_image: str = field(default="skip", metadata=_choices(
        "skip", "fail", doc="what to do with unreadable/corrupt images"))
    val_fraction: float = field(default=0.15, metadata=_fraction())
    test_fraction: float = field(default=0.15, metadata=_fraction("ignored with data.test_path"))
    split_seed: int | None = field(default=None, metadata={
        "doc": "seed of the train/val/test split; default: seed. Keep it to test later runs "
               "(other training seeds) on the same images"})
    test_path: str | None = field(default=None, metadata={
        "doc": "a labelled folder or CSV manifest used as the test split (never for training "
               "or selection): runs over more or other data.path images share a test set"})
    mean: list[float] = field(default_factory=lambda: [0.5], metadata={
        "doc": "normalisation mean per channel or one for all (ImageNet's when model.pretrained)"})
    std: list[float] = field(default_factory=lambda: [0.5], metadata={"doc": "per channel, or one"})
    cache_dir: str | None = field(default=None, metadata={
        "doc": "where the built-in dataset is written; default ~/.cache/visiontune"})
    cv_folds: int = field(default=0, metadata=_check(
        lambda v: v == 0 or v >= 2, "must be 0 (off) or >= 2",
        "k-fold CV on train+val: a trial scores the mean val F1 over folds"))
    loader_workers: int = field(default=0, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "DataLoader worker processes per training worker"))
    preprocess: bool = field(default=True, metadata={
        "doc": "decode every image once per sweep into a store beside the checkpoints "
               "(ray.storage_path/preprocessed/), reused by later runs over the same files; "
               "trials read it instead of decoding"})
    cache: str = field(default="auto", metadata=_choices(
        "auto", "memory", "none", doc="decoded images: memory = each training worker keeps "
        "its own shard after the first epoch, none = decode every epoch, auto = memory when "
        "a worker's shard fits in cache_max_mb"))
    cache_max_mb: float = field(default=256, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "data.cache=auto: the most a worker keeps decoded"))
    near_copy_distance: int = field(default=4, metadata=_check(
        lambda v: 0 <= v <= 64, "must be in [0, 64]",
        "near-copies: images whose 64-bit perceptual hashes differ in at most this many bits "
        "are one group, kept in one split (0: exact copies only)"))


@dataclass
class AugmentConfig:
    train: list[dict] = field(default_factory=lambda: copy.deepcopy(DIGITS_AUGMENT), metadata={
        "doc": "albumentations transforms for the train split: [{name: Affine, rotate: 10}, ...]"})


@dataclass
class CnnConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128], metadata={
        "doc": "output channels of each conv block"})
    kernel_size: int = field(default=3, metadata=_positive())
    batch_norm: bool = True
    pooling: str = field(default="max", metadata=_choices(*POOLING_NAMES))
    block_dropout: float = field(default=0.0, metadata=_fraction("Dropout2d after each block"))


@dataclass
class ModelConfig:
    name: str = field(default="cnn", metadata={
        "choices": _model_names, "known": ("cnn",),  # valid without importing torchvision
        "doc": "cnn, or a torchvision backbone (resnet18, ...)"})
    dropout: float = field(default=0.2, metadata=_fraction("before the classifier"))
    initializer: str = field(default="kaiming_normal", metadata=_choices(*INITIALIZER_NAMES))
    activation: str = field(default="relu", metadata=_choices(*ACTIVATION_NAMES, doc="CNN only"))
    pretrained: bool = field(default=False, metadata={
        "doc": "ImageNet weights from weights_path or the torch hub cache (never downloaded)"})
    weights_path: str | None = None
    freeze: str = field(default="none", metadata=_choices(
        "none", "backbone", "stage", doc="transfer models: what starts frozen; stage = the "
        "backbone up to and including model.freeze_stage"))
    freeze_stage: str | None = field(default=None, metadata={
        "doc": "module name for freeze=stage, e.g. layer2 (resnet) or features.3"})
    unfreeze_epoch: int | None = field(default=None, metadata={
        "doc": "epoch from which the frozen part trains too (gradual unfreezing)"})
    backbone_lr_mult: float = field(default=1.0, metadata=_check(
        lambda v: 0 < v <= 1, "must be in (0, 1]", "backbone lr = train.lr x this"))
    cnn: CnnConfig = field(default_factory=CnnConfig)


@dataclass
class TrainConfig:
    epochs: int = field(default=6, metadata=_positive())
    batch_size: int = field(default=32, metadata=_positive("per worker"))
    optimizer: str = field(default="adam", metadata=_choices(*OPTIMIZER_NAMES))
    lr: float = field(default=1e-3, metadata=_positive())
    momentum: float = field(default=0.9, metadata=_fraction("SGD family"))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata=_check(
        lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), "must be two numbers in [0, 1)",
        "Adam family"))
    eps: float = field(default=1e-8, metadata=_positive("Adam family, RMSprop, Adagrad, Adadelta"))
    weight_decay: float = field(default=0.0, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "L2 penalty (decoupled for adamw)"))
    l1: float = field(default=0.0, metadata=_check(lambda v: v >= 0, "must be >= 0",
                                                    "L1 penalty on trainable weights"))
    grad_clip: float | None = field(default=None, metadata=_positive("max gradient norm"))
    label_smoothing: float = field(default=0.0, metadata=_fraction())
    scheduler: str = field(default="cosine", metadata=_choices(*SCHEDULER_NAMES))
    step_size: int = field(default=3, metadata=_positive("step scheduler: epochs per step"))
    gamma: float = field(default=0.1, metadata=_check(
        lambda v: 0 < v < 1, "must be in (0, 1)", "step and plateau schedulers: lr factor"))
    patience: int = field(default=3, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "early stopping: epochs without val_f1 gain; 0 = off"))
    num_workers: int | str = field(default="auto", metadata=_check(
        lambda v: v == "auto" or (isinstance(v, int) and v > 0), "must be auto or an integer > 0",
        "workers per trial: auto = the plan chooses (trials side by side, or DDP where it pays);"
        " N = DDP with N Ray Train workers"))
    use_gpu: bool = field(default=False, metadata={"doc": "NCCL + one GPU per worker"})
    cpus_per_worker: float = field(default=1.0, metadata=_positive())
    resources_per_worker: dict = field(default_factory=dict, metadata={
        "doc": "extra or overriding Ray resources per worker, e.g. {CPU: 4, GPU: 1, memory: 8e9}"})
    amp: bool = field(default=True, metadata={"doc": "mixed precision (GPU only)"})
    max_failures: int = field(default=1, metadata=_check(
        lambda v: v >= -1, "must be >= -1", "worker-group restarts from the last checkpoint"))


@dataclass
class SearchConfig:
    mode: str = field(default="grid+random", metadata=_choices("grid", "random", "grid+random"))
    algorithm: str = field(default="basic", metadata=_choices(
        "basic", "optuna", doc="basic = Tune's grid/random generator; optuna = TPE (no grid axes)"))
    scheduler: str = field(default="none", metadata=_choices(
        "none", "asha", "asha_global", doc="asha stops weak trials early (they end KILLED), "
        "comparing each trial with its own model family; asha_global: Tune's ASHA, every "
        "trial against every other"))
    grace_period: int = field(default=1, metadata=_positive("asha: epochs before stopping"))
    reduction_factor: int = field(default=2, metadata=_check(lambda v: v >= 2, "must be >= 2"))
    max_trials: int | None = field(default=None, metadata=_positive("cap on trials launched"))
    budget: str | None = field(default="2m30s", metadata=_check(
        _is_duration, "must be a duration such as 90s, 4m or 2h",
        "wall time of the sweep (90s, 4m, 2h; null: none): trials and epochs per model family "
        "are planned to fit it, running trials stop at an epoch boundary when it runs out"))
    stop_at_f1: float | None = field(default=None, metadata=_check(
        lambda v: 0 < v <= 1, "must be in (0, 1]",
        "no new trial once a trial reaches this val F1 (running trials finish)"))
    stop_no_improvement: int | None = field(default=None, metadata=_positive(
        "no new trial after this many finished trials in a row did not beat the best val F1"))
    num_samples: int = field(default=1, metadata=_positive(
        "random draws (per grid point in grid+random)"))
    max_concurrent_trials: int | None = field(default=None, metadata={
        "doc": "cap on parallel trials; default: as many as the cluster fits"})
    space: dict = field(default_factory=lambda: copy.deepcopy(DEFAULT_SPACE), metadata={
        "doc": "dotted config key -> {grid: [...]} | {choice: [...]} | {uniform: [lo, hi]} | "
               "{loguniform: [lo, hi]} | {randint: [lo, hi]} | {quniform: [lo, hi, q]}, "
               "optionally with when: {key: [values]}"})


@dataclass
class EvaluationConfig:
    average: str = field(default="auto", metadata=_choices(
        "auto", "binary", "macro", "weighted", doc="F1 averaging; auto = binary for 2 classes"))


@dataclass
class TrackingConfig:
    uri: str | None = field(default=None, metadata={
        "doc": "MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db"})
    experiment_name: str = "visiontune"
    artifact_location: str | None = field(default=None, metadata={
        "doc": "artifact root for a new experiment; default <cwd>/mlruns"})
    outage_grace_s: float = field(default=900.0, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "how long a sweep rides out a tracking server that does "
        "not answer, journaling what it logs (docs/faults.md); 0 stops it at once"))
    system_metrics_s: float = field(default=10.0, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "how often a trial's training process records its "
        "CPU, memory (and GPU) use as system/... metrics (docs/mlflow.md); 0: off"))


@dataclass
class RegistryConfig:
    model_name: str = "visiontune-classifier"
    min_f1_gain: float = field(default=0.0, metadata=_check(
        lambda v: v >= 0, "must be >= 0", "promote: the F1 gain the challenger must be shown "
        "to have (the lower bound of the paired interval must be above it)"))
    max_comparisons: int = field(default=10, metadata=_positive(
        "promote: comparisons allowed on the same test images before fresh ones (--data) are "
        "needed: every look at them spends their evidence"))
    max_class_drop: float | None = field(default=None, metadata=_check(
        lambda v: 0 <= v <= 1, "must be in [0, 1]", "promote: refuse when any class's F1 "
        "drops by more than this (off by default)"))
    min_images: int = field(default=30, metadata=_positive(
        "promote: the fewest images neither model trained or selected on that it decides on"))
    hooks: list[str] = field(default_factory=list, metadata={"doc": "URLs told of champion moves"})
    hook_attempts: int = field(default=4, metadata=_positive("tries per hook delivery"))
    require_promotion_record: bool = field(default=False, metadata={
        "doc": "refuse a champion moved outside visiontune"})
    approval: str = field(default="none", metadata=_choices("none", "required"))


@dataclass
class RayConfig:
    address: str | None = field(default=None, metadata={
        "doc": "existing cluster (auto, ray://...); default: start a local Ray"})
    num_cpus: int | None = field(default=None, metadata={"doc": "local Ray only"})
    storage_path: str | None = field(default=None, metadata={
        "doc": "Tune/Train checkpoints; default <cwd>/ray_results (shared storage on a cluster)"})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    seed: int = 0


# ----------------------------------------------------------------------------- validation

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for tp_ in inner[:-1]:   # int | str: the first type that takes the value
            try:
                return _coerce(value, tp_, key)
            except ConfigError:
                pass
        return _coerce(value, inner[-1], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            with contextlib.suppress(ValueError):  # YAML reads 1e-3 (no dot) as a string
                return float(value)
        raise ConfigError(f"{key}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}={value!r} must be a string")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    raise TypeError(f"unsupported config type {tp} for {key}")


def from_dict(cls: type, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict, checking keys, types, choices and ranges."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; valid keys: "
                          f"{', '.join(prefix + n for n in fields)}")
    kwargs = {}
    for name in [n for n in fields if n in data]:
        key = prefix + name
        value = _coerce(data[name], hints[name], key)
        meta = fields[name].metadata
        choices = meta.get("choices")
        if choices is not None and value is not None and value not in meta.get("known", ()):
            valid = choices() if callable(choices) else choices
            if value not in valid:
                shown = ", ".join(map(str, valid[:30])) + (", ..." if len(valid) > 30 else "")
                raise ConfigError(f"{key}={value!r} is not valid; choose one of: {shown}")
        if "check" in meta and value is not None and not meta["check"](value):
            raise ConfigError(f"{key}={value!r} {meta['rule']}")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def validate_config(cfg: Config) -> Config:
    """Cross-field rules that one key's metadata cannot express."""
    d = cfg.data
    if d.val_fraction + d.test_fraction >= 0.9:
        raise ConfigError("data.val_fraction + data.test_fraction must leave >= 10% for training")
    if d.val_fraction <= 0 or d.test_fraction <= 0:
        raise ConfigError("data.val_fraction and data.test_fraction must be > 0")
    for key in ("mean", "std"):
        values = getattr(d, key)
        if len(values) not in (1, d.channels):
            raise ConfigError(f"data.{key} needs 1 or data.channels={d.channels} values, "
                              f"got {len(values)}")
    from components.augment import build_augmentation

    for spec in cfg.augment.train:
        try:
            build_augmentation(spec, d.image_size)
        except ValueError as e:
            raise ConfigError(f"augment.train: {e}") from None
    check_model(cfg.model)
    for key in URI_KEYS:
        section, name = key.split(".")
        check_no_credentials(key, getattr(getattr(cfg, section), name))
    if cfg.search.scheduler == "asha" and d.cv_folds:
        raise ConfigError("search.scheduler=asha needs per-epoch scores; it cannot run with "
                          "data.cv_folds (a trial's score is known only after every fold)")
    return cfg


def check_model(m: ModelConfig) -> ModelConfig:
    """Rules across model keys; also run on every trial's combination of search values."""
    if m.name == "cnn" and (m.freeze != "none" or m.backbone_lr_mult != 1.0 or m.pretrained):
        raise ConfigError("model.pretrained, model.freeze and model.backbone_lr_mult apply to "
                          "transfer models, not model.name=cnn")
    if m.freeze == "stage" and not m.freeze_stage:
        raise ConfigError("model.freeze=stage needs model.freeze_stage (e.g. layer2)")
    if m.unfreeze_epoch is not None and m.freeze == "none":
        raise ConfigError("model.unfreeze_epoch needs model.freeze=backbone or stage")
    return m
