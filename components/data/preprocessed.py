"""Decoded once per sweep: every image of a dataset decoded to the training size and colour
mode (the shared preprocessing, `components.imaging`, reduced-scale JPEG decode
included) into one uint8 array file, stored beside the run's checkpoints (a local folder or
the bucket) where every node reads it. Every trial's ranks read their rows from it instead of
decoding the files again; augmentation stays per epoch and per trial.

A store is keyed by what decides its contents: the data's root, each file's relative path and
bytes hash, the image size, the channels, the preprocessing's VERSION and this format's. A
later run (or a resumed one) over the same files reuses it; one changed image, another size or
another preprocessing builds a new one.

Layout of `<storage_path>/preprocessed/<key>/`: `images.npy` (N x size x size x channels,
uint8, rows in `index.json`'s order; a row whose file did not decode stays zero) and
`index.json` (the paths, the images that did not decode and why), written last: a store
without it is incomplete and is built again.

Why one .npy file (docs/data.md, "Decoded once per sweep"; measured in docs/performance.md): a
row is a fixed-size slice at a computable offset, so a rank reads exactly its rows with one
`pread` each (random access for shuffling, no index to parse, no memory that grows with the
data: read rows go through the page cache, not the process's heap), numpy writes and reads it
with no other library, and in a bucket it is one object per dataset that each node copies once
to its local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from components import storage

FORMAT = 1
IMAGES, INDEX = "images.npy", "index.json"
# Where a node keeps its copies of stores that live in a bucket (default: the temp folder).
LOCAL_COPIES_ENV = "VISIONTUNE_PREPROCESSED_DIR"


def _relative(path: str, root: str) -> str:
    return os.path.relpath(path.split("://", 1)[-1].partition("?")[0],
                           root.split("://", 1)[-1].partition("?")[0])


def store_key(root: str, paths: Iterable[str], digests: Iterable[str], image_size: int,
              channels: int) -> str:
    """The key of the store of these files (each with its bytes' sha256) at this size. The
    root is part of it: a store's rows are found by the paths it was built from."""
    from components.imaging import VERSION

    h = hashlib.sha256(json.dumps({"format": FORMAT, "preprocessing": VERSION, "root": root,
                                   "image_size": image_size, "channels": channels}).encode())
    for rel, digest in sorted((_relative(p, root), d) for p, d in zip(paths, digests)):
        h.update(f"{rel}\t{digest}\n".encode())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class DecodedImages:
    """A store: where it is, its rows (one per path) and the paths that did not decode."""

    location: str
    key: str
    paths: tuple[str, ...]
    image_size: int
    channels: int
    bad: dict[str, str] = field(default_factory=dict)
    decoded: int = 0     # images this process decoded to build it (0: an existing store)

    @property
    def row_bytes(self) -> int:
        return self.image_size * self.image_size * self.channels


def store_location(storage_path: str, key: str) -> str:
    return storage.join(storage_path, "preprocessed", key)


def open_store(location: str) -> DecodedImages | None:
    """The store at `location`, or None when it is missing or incomplete."""
    index = storage.join(location, INDEX)
    if storage.file_type(index) != "file":
        return None
    meta = json.loads(storage.read_bytes(index))
    if meta.get("format") != FORMAT:
        return None
    return DecodedImages(location, meta["key"], tuple(meta["paths"]), meta["image_size"],
                         meta["channels"], dict(meta["bad"]))


def _decode(path: str, image_size: int, channels: int) -> np.ndarray:
    from components.data.dataset import load_image

    return load_image(path, channels, image_size)


def _decode_chunk(paths: list[str], image_size: int,
                  channels: int) -> tuple[np.ndarray, dict[str, str]]:
    """These images decoded (a row of zeros and a reason for one that does not decode)."""
    out = np.zeros((len(paths), image_size, image_size, channels), np.uint8)
    bad: dict[str, str] = {}
    for i, path in enumerate(paths):
        try:
            out[i] = _decode(path, image_size, channels)
        except storage.StorageError:
            raise   # the bucket failing to answer is not a bad image
        except Exception as e:  # PIL raises many types for broken files
            bad[path] = f"{type(e).__name__}: {e}"
    return out, bad


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def map_on_threads(fn: Callable, items: list[tuple]) -> Iterator[tuple[int, object]]:
    """(index, fn(*item)) for every item, on this machine's cores (threads: decoding and
    resizing release the GIL), in order."""
    with ThreadPoolExecutor(min(8, (os.cpu_count() or 1) * 2)) as pool:
        yield from enumerate(pool.map(lambda item: fn(*item), items))


def build_store(storage_path: str, key: str, paths: list[str], image_size: int,
                channels: int, *, progress: Callable[[int, int], None] | None = None,
                map_chunks: Callable | None = None) -> DecodedImages:
    """Decode `paths` into a new store, in chunks run by `map_chunks(fn, items)` (yielding
    `(index, fn(*items[index]))` in any order): this machine's threads by default, Ray tasks
    across a cluster with `components.cluster.ray_map`. Written locally first and published
    with its index last, so a stopped build leaves nothing that looks complete."""
    location = store_location(storage_path, key)
    remote = storage.is_uri(location)
    work = tempfile.mkdtemp(prefix=f"vt-preprocess-{key[:8]}-",
                            dir=None if remote else _parent_dir(location))
    try:
        rows = np.lib.format.open_memmap(os.path.join(work, IMAGES), mode="w+",
                                         dtype=np.uint8,
                                         shape=(len(paths), image_size, image_size, channels))
        bad: dict[str, str] = {}
        parts = _chunks(len(paths), 32)
        items = [([paths[i] for i in part], image_size, channels) for part in parts]
        done = 0
        for k, (out, failed) in (map_chunks or map_on_threads)(_decode_chunk, items):
            rows[parts[k].start:parts[k].stop] = out
            bad.update(failed)
            done += len(parts[k])
            if progress is not None:
                progress(done, len(paths))
        rows.flush()
        meta = {"format": FORMAT, "key": key, "image_size": image_size, "channels": channels,
                "paths": list(paths), "bad": bad}
        with open(os.path.join(work, INDEX), "w") as f:
            json.dump(meta, f)
        _publish(work, location)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DecodedImages(location, key, tuple(paths), image_size, channels, bad,
                         decoded=len(paths))


def _parent_dir(location: str) -> str:
    parent = os.path.dirname(location)
    os.makedirs(parent, exist_ok=True)
    return parent


def _publish(work: str, location: str) -> None:
    """The array, then the index (what marks the store complete)."""
    if not storage.is_uri(location):
        if os.path.isdir(location):   # another run built it meanwhile, or a stopped build
            shutil.rmtree(location, ignore_errors=True)
        os.replace(work, location)
        return
    fs, inner = storage.resolve(location)
    if location.split("://", 1)[0] not in storage.BUCKET_SCHEMES:   # buckets have no folders
        fs.create_dir(inner, recursive=True)
    for name in (IMAGES, INDEX):
        with open(os.path.join(work, name), "rb") as src, \
                fs.open_output_stream(f"{inner}/{name}") as dst:
            shutil.copyfileobj(src, dst, 8 * 2**20)


class RowReader:
    """Rows of a store by number, read with one `pread` each from a local file: the store's own
    when it is local, else this node's copy (made once per node, by the first reader)."""

    def __init__(self, store: DecodedImages):
        self.store = store
        self._fd: int | None = None
        self._offset = 0

    def __getstate__(self):   # DataLoader worker processes open their own file
        return {"store": self.store, "_fd": None, "_offset": 0}

    def _open(self) -> int:
        path = self._local_file()
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _, dtype = header(f)
            self._offset = f.tell()
        s = self.store
        if tuple(shape[1:]) != (s.image_size, s.image_size, s.channels) or dtype != np.uint8:
            raise ValueError(f"{path}: rows of {shape[1:]} {dtype}, expected "
                             f"{(s.image_size, s.image_size, s.channels)} uint8")
        self._fd = os.open(path, os.O_RDONLY)
        return self._fd

    def _local_file(self) -> str:
        location = self.store.location
        if not storage.is_uri(location):
            return os.path.join(location, IMAGES)
        root = os.environ.get(LOCAL_COPIES_ENV) or os.path.join(tempfile.gettempdir(),
                                                                "visiontune-preprocessed")
        local = os.path.join(root, self.store.key, IMAGES)
        if os.path.isfile(local):
            return local
        os.makedirs(os.path.dirname(local), exist_ok=True)
        import fcntl

        with open(local + ".lock", "w") as lock:   # one copy per node, whoever comes first
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isfile(local):
                part = f"{local}.{uuid.uuid4().hex}.part"
                try:
                    with storage.open_input(storage.join(location, IMAGES)) as src, \
                            open(part, "wb") as dst:
                        shutil.copyfileobj(src, dst, 8 * 2**20)
                    os.replace(part, local)
                finally:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(part)
        return local

    def __getitem__(self, row: int) -> np.ndarray:
        fd = self._fd if self._fd is not None else self._open()
        n, s = self.store.row_bytes, self.store
        data = os.pread(fd, n, self._offset + row * n)
        if len(data) != n:
            raise OSError(f"{s.location}: row {row} is cut short ({len(data)} of {n} bytes)")
        return np.frombuffer(data, np.uint8).reshape(s.image_size, s.image_size,
                                                     s.channels).copy()

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows start..stop-1 with one `pread`: a pass over the whole store, block by block."""
        fd = self._fd if self._fd is not None else self._open()
        n, s = self.store.row_bytes, self.store
        data = os.pread(fd, n * (stop - start), self._offset + start * n)
        if len(data) != n * (stop - start):
            raise OSError(f"{s.location}: rows {start}..{stop} are cut short")
        return np.frombuffer(data, np.uint8).reshape(stop - start, s.image_size, s.image_size,
                                                     s.channels)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class DecodedLookup:
    """Decoded images by path, over one or more stores (the data, and data.test_path's), of
    those stores at `image_size` and `channels` (a trial that searches the size decodes)."""

    def __init__(self, stores: Iterable[DecodedImages], image_size: int, channels: int):
        self.readers = [RowReader(s) for s in stores
                        if (s.image_size, s.channels) == (image_size, channels)]
        self._where = {p: (k, i) for k, r in enumerate(self.readers)
                       for i, p in enumerate(r.store.paths)}

    def __contains__(self, path: str) -> bool:
        return path in self._where

    def image(self, path: str) -> np.ndarray:
        k, row = self._where[path]
        return self.readers[k][row]
