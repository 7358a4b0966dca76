"""Image loading (the eval-time preprocessing's first half) and a torch Dataset."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from components import storage
from components.imaging import open_image, to_array


def load_image(path_or_image, channels: int, image_size: int) -> np.ndarray:
    """Any file PIL reads (a path, an object-storage URI or a PIL image), any size or colour
    mode -> uint8 array (size, size, channels): EXIF rotation applied, converted to L or RGB,
    bilinear resize to a square. The registered model decodes with the same code
    (`components.imaging`, logged with it)."""
    if isinstance(path_or_image, Image.Image):
        img = path_or_image
    elif storage.is_uri(path_or_image):  # object storage
        from components.data.ingest import open_file

        with open_file(str(path_or_image)) as f:
            img = open_image(f.read(), image_size)
    else:
        img = open_image(str(path_or_image), image_size)
    with img:
        return to_array(img, channels, image_size)


class ImageDataset(Dataset):
    """Yields (image tensor CxHxW, label, index). The index lets evaluation gather predictions
    from every DDP rank and put each one back on its row, with no duplicates.

    With `decoded` (the sweep's store of decoded images, `components.data.preprocessed`) an
    image is read from it, already at this size. Otherwise images are decoded when first
    asked for: with `cache`, each decoded image is kept for the next epoch (this dataset's rows
    only: a rank's shard, never the whole split); without it, every epoch decodes again and
    memory does not grow with the data. `decodes` counts the files this dataset decoded."""

    def __init__(self, paths: list[str], labels: list[int], channels: int, image_size: int,
                 transform: Callable[..., dict], cache: bool = False,
                 ids: list[int] | None = None, decoded=None):
        """`ids`: the index each row reports (default its position), e.g. its row number in
        the whole split when this dataset holds one rank's shard; `decoded`: a
        `DecodedLookup` holding these paths at this size and channels."""
        self.paths, self.labels = list(paths), list(labels)
        self.ids = list(ids) if ids is not None else list(range(len(self.paths)))
        self.channels, self.image_size = channels, image_size
        self.transform = transform
        self.decoded = decoded
        self._cache: dict[int, np.ndarray] | None = {} if cache and decoded is None else None
        self.decodes = 0

    def _load(self, i: int) -> np.ndarray:
        if self.decoded is not None and self.paths[i] in self.decoded:
            return self.decoded.image(self.paths[i])
        self.decodes += 1
        return load_image(self.paths[i], self.channels, self.image_size)

    def image(self, i: int) -> np.ndarray:
        """Row `i` decoded (uint8 HxWxC), from the store or the cache when they hold it."""
        if self._cache is None:
            return self._load(i)
        img = self._cache.get(i)
        if img is None:
            img = self._cache[i] = self._load(i)
        return img

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        x = self.transform(image=self.image(i))["image"]
        return x, torch.tensor(self.labels[i]), self.ids[i]


def decoded_bytes(num_images: int, channels: int, image_size: int) -> int:
    return num_images * channels * image_size * image_size


def use_cache(mode: str, num_images: int, channels: int, image_size: int,
              max_mb: float) -> bool:
    """data.cache: `memory` keeps decoded images, `none` decodes every epoch, `auto` keeps
    them when this worker's share fits in `max_mb`."""
    if mode != "auto":
        return mode == "memory"
    return decoded_bytes(num_images, channels, image_size) <= max_mb * 2**20


def shard_indices(num_rows: int, rank: int, world: int, seed: int) -> list[int]:
    """This rank's fixed share of the rows: a seeded permutation dealt round-robin, padded
    (as DistributedSampler pads) so that every rank holds as many rows and every DDP rank runs
    the same number of steps. A fixed share lets a rank read, decode and cache only its own
    rows, every epoch."""
    if num_rows == 0:
        return []
    perm = np.random.default_rng(seed).permutation(num_rows).tolist()
    per_rank = -(-num_rows // world)
    while len(perm) < per_rank * world:
        perm += perm[: per_rank * world - len(perm)]
    return perm[rank::world]


class EpochShuffle(Sampler[int]):
    """A fresh, seeded order of a rank's rows each epoch (`set_epoch`, as DistributedSampler)."""

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=g).tolist())


def seed_loader_worker(worker_id: int) -> None:
    """`DataLoader(worker_init_fn=...)`: each loader process draws its own augmentations.
    Every worker starts with a copy of the dataset's transform and its RNG state, so without
    this they all apply the same random crops and flips (torch's documented recipe: seed each
    worker's libraries from torch's per-worker seed, base seed + worker id)."""
    import random

    info = torch.utils.data.get_worker_info()
    seed = info.seed % 2**32
    random.seed(seed)
    np.random.seed(seed)
    transform = getattr(info.dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):   # albumentations keeps its own generator
        transform.set_random_seed(seed)
