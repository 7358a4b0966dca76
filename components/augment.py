"""albumentations pipelines from config: random augmentation for training, deterministic
resize + normalise for evaluation (images arrive already resized by `load_image`)."""

from __future__ import annotations

import inspect
import os

# albumentations 2.x asks PyPI for a newer version when imported (2 s timeout): on an offline
# cluster that stalls the driver and every Train worker, and nothing is downloaded at run time
# here. Set before the import, in every process that imports this module (workers, jobs);
# set, not defaulted: an empty or "0" value inherited from a shell would turn the check on.
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

import albumentations as A  # noqa: E402
import numpy as np
import torch

# The transforms a config may name; each maps to the albumentations class of the same name.
AUGMENTATIONS = {
    "RandomResizedCrop": A.RandomResizedCrop,
    "HorizontalFlip": A.HorizontalFlip,
    "VerticalFlip": A.VerticalFlip,
    "Affine": A.Affine,
    "Rotate": A.Rotate,
    "ColorJitter": A.ColorJitter,
    "GaussianBlur": A.GaussianBlur,
    "CoarseDropout": A.CoarseDropout,
}


class _ToTensor(A.ImageOnlyTransform):
    """HWC float -> CHW torch tensor (albumentations.pytorch.ToTensorV2 minus the import cost)."""

    def __init__(self):
        super().__init__(p=1.0)

    def apply(self, img, **params):
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))


def _broadcast(values: list[float], channels: int) -> list[float]:
    return list(values) * channels if len(values) == 1 else list(values)


def _normalize(mean, std, channels):
    return A.Normalize(mean=_broadcast(mean, channels), std=_broadcast(std, channels),
                       max_pixel_value=255.0)


def build_augmentation(spec: dict, image_size: int) -> A.BasicTransform:
    """One transform from {name: ..., <its parameters>}; unknown names list the valid ones."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
    if name == "RandomResizedCrop":
        spec.setdefault("size", (image_size, image_size))
    # albumentations only warns about unknown arguments; a typo in conf/ must be an error.
    accepted = {n for n, p in inspect.signature(AUGMENTATIONS[name].__init__).parameters.items()
                if p.kind is not inspect.Parameter.VAR_KEYWORD} - {"self"}
    unknown = sorted(set(spec) - accepted)
    if unknown:
        raise ValueError(f"bad parameters for augmentation {name}: {', '.join(unknown)} "
                         f"(valid: {', '.join(sorted(accepted))})")
    try:
        return AUGMENTATIONS[name](**spec)
    except TypeError as e:
        raise ValueError(f"bad parameters for augmentation {name}: {e}") from None


def build_train_transform(specs: list[dict], image_size: int, channels: int,
                          mean: list[float], std: list[float], seed: int | None = None
                          ) -> A.Compose:
    """`seed` makes the random augmentations reproducible (albumentations keeps its own RNG)."""
    steps = [build_augmentation(s, image_size) for s in specs]
    return A.Compose([*steps, _normalize(mean, std, channels), _ToTensor()], seed=seed)


def build_eval_transform(channels: int, mean: list[float], std: list[float]) -> A.Compose:
    return A.Compose([_normalize(mean, std, channels), _ToTensor()])


def normalize_batch(images: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW, the eval transform for a whole batch (used at inference)."""
    c = images.shape[-1]
    m = np.asarray(_broadcast(mean, c), np.float32)
    s = np.asarray(_broadcast(std, c), np.float32)
    x = (images.astype(np.float32) / 255.0 - m) / s
    return x.transpose(0, 3, 1, 2).copy()


IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def eval_preprocessing(data_cfg, model_cfg) -> dict:
    """The eval-time preprocessing as plain data: logged with the model so anyone can
    reproduce it with PIL and numpy. Pretrained backbones get the statistics they were
    trained with (ImageNet's); everything else the configured data.mean/std."""
    c = data_cfg.channels
    if model_cfg.pretrained:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if c == 3 else ([0.449], [0.226])
    else:
        mean, std = _broadcast(data_cfg.mean, c), _broadcast(data_cfg.std, c)
    return {
        "image_size": data_cfg.image_size,
        "channels": c,
        "color_mode": "L" if c == 1 else "RGB",
        "resize": "bilinear, to image_size x image_size (aspect ratio not kept)",
        "scale": "pixel / 255",
        "mean": list(mean),
        "std": list(std),
        "layout": "NCHW float32",
    }


def plot_augmented_samples(images: list[np.ndarray], transform: A.Compose, mean: list[float],
                           std: list[float], n: int = 16, seed: int = 0):
    """A grid of `n` training images as the model sees them (augmented, then un-normalised
    for display): the quickest way to spot an augmentation that destroys the label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    picks = rng.choice(len(images), size=min(n, len(images)), replace=False)
    cols = 4
    rows = -(-len(picks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 1.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, picks):
        x = transform(image=images[i])["image"].numpy().transpose(1, 2, 0)
        c = x.shape[2]
        x = x * np.asarray(_broadcast(std, c)) + np.asarray(_broadcast(mean, c))
        x = np.clip(x, 0, 1)
        ax.imshow(x[:, :, 0] if c == 1 else x, cmap="gray" if c == 1 else None)
    fig.suptitle("augmented training samples", fontsize=9)
    fig.tight_layout()
    return fig
