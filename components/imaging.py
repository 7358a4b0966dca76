"""Image decoding and the eval-time preprocessing, once, for training and for the registered
model.

The training pipeline's image loader (`components.data.dataset.load_image`), the data checks
(`components.data`), the registered model (`components/serving/image_classifier.py` loads the
copy of this file logged with it, as the artifact `preprocessing.py`) and `visiontune predict`
all decode and resize with these functions. The model carries its own copy, so this file
imports only numpy and PIL (no mlflow, no torch, nothing of this repository): a serving
process that knows nothing of visiontune loads it from the model's artifacts.

Steps: the header checked against the limits below, then the first frame decoded (a JPEG
much larger than the target size at a reduced scale: libjpeg's DCT-domain downscaling,
Pillow's `draft`, to the smallest scale that keeps at least twice the target size on both
sides, before the bilinear resize; about 4.5x faster for a 12 MP photo to 224 px); EXIF
orientation applied; 16-bit and float greyscale scaled into 8 bits (in float32); converted to L
(1 channel) or RGB (3; an alpha channel is dropped, palettes expanded); bilinear resize to
image_size x image_size (aspect ratio not kept); pixel / 255; (x - mean) / std; NCHW float32.

Limits, the same for training, `visiontune predict` and the served model (what a client can
send must not stall or exhaust a server): only the formats of `FORMATS`; at most
`max_pixels()` pixels (default 50 million, `VISIONTUNE_MAX_IMAGE_PIXELS`), checked on the
header before any pixel is decoded (Pillow's own limit is 179 million and only warns below);
at most `max_image_bytes()` bytes per file (default 64 MB, `VISIONTUNE_MAX_IMAGE_BYTES`);
and, for the served model, at most `max_request_pixels()` pixels decoded per request (default
1,000 million, `VISIONTUNE_MAX_REQUEST_PIXELS`, counted at the scale actually decoded: a
JPEG's reduced one), so that many images just under the per-image limit cannot hold a
scoring worker for minutes. An image over a limit raises `ImageRefused`: one row's error, one
skipped training image.
"""

from __future__ import annotations

import io
import os
import re
import warnings

import numpy as np
from PIL import Image, ImageOps

RESAMPLE = Image.Resampling.BILINEAR
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
# What users' photos and datasets come in. Not PSD, SGI, FLI, EPS (Ghostscript), ...: every
# format Pillow knows is code a client could reach.
FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")
MAX_PIXELS_ENV, MAX_BYTES_ENV = "VISIONTUNE_MAX_IMAGE_PIXELS", "VISIONTUNE_MAX_IMAGE_BYTES"
MAX_REQUEST_PIXELS_ENV = "VISIONTUNE_MAX_REQUEST_PIXELS"
DEFAULT_MAX_PIXELS = 50_000_000    # a 48 MP phone photo passes; Pillow's default is 179 M
# About 15 s of decoding on one core (a 49 M pixel PNG takes ~0.7 s); 64 photos of 12 MP
# (a batch of `visiontune predict`) stay well under it, JPEGs far under (reduced scale).
DEFAULT_MAX_REQUEST_PIXELS = 1_000_000_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_ROWS = 512   # rows of a 16-bit image scaled at once: memory stays a few MB per row block
DRAFT_FACTOR = 2
# Changes whenever these steps change what a given file decodes to: preprocessed data
# (components.data.preprocessed) built by another version is not reused.
VERSION = 2


class ImageRefused(ValueError):
    """An image outside the decoding limits (format, pixels, bytes)."""


def _limit(env: str, default: int) -> int:
    value = os.environ.get(env, "").strip()
    try:
        return int(float(value)) if value else default
    except ValueError:
        raise ImageRefused(f"{env}={value!r} is not a number") from None


def max_pixels() -> int:
    return _limit(MAX_PIXELS_ENV, DEFAULT_MAX_PIXELS)


def max_image_bytes() -> int:
    return _limit(MAX_BYTES_ENV, DEFAULT_MAX_BYTES)


def max_request_pixels() -> int:
    return _limit(MAX_REQUEST_PIXELS_ENV, DEFAULT_MAX_REQUEST_PIXELS)


def open_image(source, image_size: int | None = None,
               pixels_left: int | None = None) -> Image.Image:
    """Bytes of an image file, a path, or a PIL image -> its first frame, decoded, within the
    limits (`ImageRefused` otherwise; PIL's own errors for broken files). With `image_size`
    (the square it will be resized to), a JPEG is decoded at the smallest reduced scale that
    keeps at least `DRAFT_FACTOR` x `image_size` pixels on both sides. `pixels_left`: what a
    request has left of `max_request_pixels()` (checked before decoding, at the decoded
    scale)."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        size, source = len(source), io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        size = os.path.getsize(source)
    else:
        raise TypeError(f"expected image bytes or a path, got {type(source).__name__}")
    if size > max_image_bytes():
        raise ImageRefused(f"{size:,} bytes is more than the limit of {max_image_bytes():,} "
                           f"({MAX_BYTES_ENV})")
    try:
        with warnings.catch_warnings():   # the limit below is stricter than Pillow's warning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(source, formats=FORMATS)
    except Image.DecompressionBombError as e:   # Pillow's own limit, hit on the header
        found = re.search(r"\((\d+) pixels\)", str(e))
        declared = f"{int(found[1]):,} pixels" if found else "the image's size"
        raise ImageRefused(f"{declared} is more than the limit of {max_pixels():,} "
                           f"({MAX_PIXELS_ENV})") from None
    width, height = img.size
    if width * height > max_pixels():   # from the header: nothing is decoded yet
        img.close()
        raise ImageRefused(f"{width} x {height} pixels is more than the limit of "
                           f"{max_pixels():,} ({MAX_PIXELS_ENV})")
    if image_size and img.format == "JPEG":
        # Both sides stay >= DRAFT_FACTOR x the square's side: the resize that follows
        # still averages several source pixels per output pixel.
        img.draft(img.mode, (DRAFT_FACTOR * image_size, DRAFT_FACTOR * image_size))
    if pixels_left is not None and img.size[0] * img.size[1] > pixels_left:
        img.close()
        raise ImageRefused(f"{width} x {height} pixels is more than this request has left of "
                           f"its {max_request_pixels():,} ({MAX_REQUEST_PIXELS_ENV}): send "
                           "fewer images per request")
    img.load()  # the first frame only; a truncated file fails here, for this image only
    return img


def _scaled_to_8_bits(img: Image.Image) -> Image.Image:
    """16-bit or float greyscale -> L, min..max onto 0..255, in float32 by blocks of rows
    (a float64 copy of a big 16-bit image cost the served model gigabytes)."""
    arr = np.asarray(img)
    lo, hi = float(arr.min()), float(arr.max())
    scale = np.float32(255.0 / ((hi - lo) or 1.0))
    out = np.empty(arr.shape, dtype=np.uint8)
    for start in range(0, arr.shape[0], _ROWS):
        block = arr[start:start + _ROWS].astype(np.float32)
        block -= np.float32(lo)
        block *= scale
        out[start:start + _ROWS] = block.astype(np.uint8)
    return Image.fromarray(out)


def to_array(img: Image.Image, channels: int, image_size: int) -> np.ndarray:
    """Any size or colour mode -> uint8 (size, size, channels)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES:
        # 16-bit/float greyscale: scale into 8 bits instead of letting convert() clip.
        img = _scaled_to_8_bits(img)
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
    batch = np.stack([to_array(open_image(im, size), c, size) for im in images])
    return normalize(batch, preprocessing["mean"], preprocessing["std"])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)
