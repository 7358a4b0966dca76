"""The built-in dataset: scikit-learn's handwritten digits written once as an image folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "visiontune"


def write_digits_folder(cache_dir: str | Path | None = None) -> Path:
    """Write the 1,797 8x8 digit images as <cache>/digits/<label>/<n>.png; reuse if complete.

    A marker file is written last, so an interrupted write is redone rather than trusted.
    """
    from sklearn.datasets import load_digits

    root = Path(cache_dir or default_cache_dir()) / "digits"
    marker = root / ".complete"
    if marker.is_file():
        return root
    digits = load_digits()
    # Pixel values are 0..16; scale to the full 8-bit range so they look like ordinary images.
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    for i, (img, label) in enumerate(zip(pixels, digits.target)):
        folder = root / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
    marker.write_text(f"{len(pixels)} images\n")
    return root
