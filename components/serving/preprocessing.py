"""The eval-time preprocessing, once, for training and for the registered model.

The training pipeline's image loader (`components.data.dataset.load_image`), the registered
model (`image_classifier.py` loads the copy of this file logged with it) and `visiontune
predict` all decode and resize with these functions. The model carries its own copy, so this
file imports only numpy and PIL (no mlflow, no torch, nothing of this repository): a serving
process that knows nothing of visiontune loads it from the model's artifacts.

Steps: EXIF orientation applied; 16-bit and float greyscale scaled into 8 bits; converted to L
(1 channel) or RGB (3; an alpha channel is dropped, palettes expanded); bilinear resize to
image_size x image_size (aspect ratio not kept); pixel / 255; (x - mean) / std; NCHW float32.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BILINEAR
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")


def open_image(source) -> Image.Image:
    """Bytes of an image file, a path, or a PIL image -> a decoded PIL image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, (str, os.PathLike)):
        img = Image.open(source)
    else:
        raise TypeError(f"expected image bytes or a path, got {type(source).__name__}")
    img.load()  # decode now: a truncated file fails here, for this image only
    return img


def to_array(img: Image.Image, channels: int, image_size: int) -> np.ndarray:
    """Any size or colour mode -> uint8 (size, size, channels)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES:
        # 16-bit/float greyscale: scale into 8 bits instead of letting convert() clip.
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    img = img.resize((image_size, image_size), RESAMPLE)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def _per_channel(values, channels: int) -> np.ndarray:
    values = list(values)
    return np.asarray(values * channels if len(values) == 1 else values, np.float32)


def normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW: pixel / 255, then (x - mean) / std per channel."""
    c = batch.shape[-1]
    x = (batch.astype(np.float32) / 255.0 - _per_channel(mean, c)) / _per_channel(std, c)
    return x.transpose(0, 3, 1, 2).copy()


def preprocess(images: list, preprocessing: dict) -> np.ndarray:
    """Images (bytes, paths or PIL images) -> the float32 NCHW batch the network takes."""
    c, size = preprocessing["channels"], preprocessing["image_size"]
    batch = np.stack([to_array(open_image(im), c, size) for im in images])
    return normalize(batch, preprocessing["mean"], preprocessing["std"])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
