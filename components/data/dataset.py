"""Image loading (the eval-time preprocessing's first half) and a torch Dataset."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

RESAMPLE = Image.Resampling.BILINEAR


def load_image(path_or_image, channels: int, image_size: int) -> np.ndarray:
    """Any file PIL reads, any size or colour mode -> uint8 array (size, size, channels).

    This is what the logged model's preprocessing describes: EXIF rotation applied, converted to
    L or RGB, bilinear resize to a square.
    """
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    elif "://" in str(path_or_image):  # object storage through fsspec
        from components.data.ingest import open_file

        with open_file(str(path_or_image)) as f:
            img = Image.open(io.BytesIO(f.read()))
    else:
        img = Image.open(path_or_image)
    with img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit/float greyscale: scale into 8 bits instead of letting convert() clip.
            arr = np.asarray(img, dtype=np.float64)
            span = float(arr.max() - arr.min()) or 1.0
            img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
        img = img.convert("L" if channels == 1 else "RGB")
        img = img.resize((image_size, image_size), RESAMPLE)
        arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


class ImageDataset(Dataset):
    """Yields (image tensor CxHxW, label, index). The index lets evaluation gather predictions
    from every DDP rank and put each one back on its row, with no duplicates."""

    def __init__(self, paths: list[str], labels: list[int], channels: int, image_size: int,
                 transform: Callable[..., dict], preload: bool = True,
                 ids: list[int] | None = None):
        """`ids`: the index each row reports (default its position), e.g. its row number in
        the whole split when this dataset holds one rank's shard."""
        self.paths, self.labels = list(paths), list(labels)
        self.ids = list(ids) if ids is not None else list(range(len(self.paths)))
        self.channels, self.image_size = channels, image_size
        self.transform = transform
        # Decoding once per worker beats decoding every epoch for the small images this
        # pipeline is sized for (the digits fit in ~2 MB).
        self.images = [self._load(i) for i in range(len(self.paths))] if preload else None

    def _load(self, i: int) -> np.ndarray:
        return load_image(self.paths[i], self.channels, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        image = self.images[i] if self.images is not None else self._load(i)
        x = self.transform(image=image)["image"]
        return x, torch.tensor(self.labels[i]), self.ids[i]
