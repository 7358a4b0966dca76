"""Check that every indexed image decodes; skip (and count) or fail on bad ones.

With a decode target (`DecodeTarget`: where the run stores data, the training size and
channels) the check is the decode that trials use: each file is read and hashed, and the
images are decoded once into a store of decoded images (`components.data.preprocessed`), or
not at all when a store of the same files at that size exists already."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass

from components import storage
from components.data.ingest import DataError, ImageIndex, open_file
from components.data.preprocessed import DecodedImages, build_store, open_store, store_key
from components.data.preprocessed import store_location as _store_location
from components.serving.preprocessing import open_image
from components.storage import StorageError

__all__ = ["DataError", "DecodeTarget", "ValidatedImages", "check_image", "validate_images"]


@dataclass(frozen=True)
class ValidatedImages:
    index: ImageIndex                      # only readable images, classes unchanged
    digests: list[str]                     # sha256 of each kept file's bytes (fingerprint)
    skipped: list[tuple[str, str]]         # (path, reason)
    decoded: DecodedImages | None = None   # the store, with a DecodeTarget


@dataclass(frozen=True)
class DecodeTarget:
    """Decode once, into a store under `storage_path`, at the training size."""

    storage_path: str
    image_size: int
    channels: int
    # Decode across a cluster: a context manager that opens the connection (made only when
    # there is something to decode) and yields the `map_chunks` that runs on it.
    cluster: Callable[[], contextlib.AbstractContextManager] | None = None


def check_image(path: str, decode: bool = True) -> tuple[str | None, str | None]:
    """(sha256 of the bytes, None) if the file fully decodes, else (None, reason); with
    `decode=False` only read and hashed (the store's build decodes it).

    The file is read once: its hash feeds the data fingerprint without a second pass.
    """
    try:
        with open_file(path) as f:
            data = f.read()
    except FileNotFoundError as e:
        return None, f"FileNotFoundError: {e}"
    except OSError as e:
        if storage.is_uri(path):
            # Object storage that fails to answer (throttling, network, expired credentials)
            # is not a bad image: skipping would quietly change the data and its fingerprint.
            raise StorageError(f"reading {path} failed: {str(e).splitlines()[0]}") from e
        return None, f"{type(e).__name__}: {e}"
    try:
        if not data:
            return None, "empty file"
        if decode:
            # The served model's decoder, with its limits: a decompression bomb or a format
            # it refuses is a skipped, counted image here too. load() decodes every byte of
            # the first frame: it catches truncated files that verify() lets pass.
            with open_image(data):
                pass
    except Exception as e:  # PIL raises many types for broken files
        return None, f"{type(e).__name__}: {e}"
    return hashlib.sha256(data).hexdigest(), None


def _checked(paths: list[str], progress: Callable[[int, int], None] | None,
             decode: bool = True):
    """check_image over `paths`, in order, on a few threads (decoding and object-storage reads
    release the GIL); `progress(done, total)` after each image."""
    threads = min(8, (os.cpu_count() or 1) * 2)
    pool = ThreadPoolExecutor(threads)
    window: deque = deque()   # a bounded number of images in flight, whatever the folder's size
    todo = iter(paths)
    try:
        for path in itertools.islice(todo, threads * 4):
            window.append(pool.submit(check_image, path, decode))
        done = 0
        while window:
            result = window.popleft().result()
            for path in itertools.islice(todo, 1):
                window.append(pool.submit(check_image, path, decode))
            done += 1
            if progress is not None:
                progress(done, len(paths))
            yield result
    finally:  # a failure stops at the first bad image: the rest is not checked
        pool.shutdown(wait=False, cancel_futures=True)


def _decoded(index: ImageIndex, found: list[tuple[str | None, str | None]],
             target: DecodeTarget, decoding: Callable[[int, int], None] | None):
    """The store of the readable files (built now, or found), and each file's reason."""
    readable = [(p, d) for p, (d, _) in zip(index.paths, found) if d is not None]
    key = store_key(index.root, [p for p, _ in readable], [d for _, d in readable],
                    target.image_size, target.channels)
    store = open_store(_store_location(target.storage_path, key))
    if store is None:
        with target.cluster() if target.cluster else contextlib.nullcontext() as map_chunks:
            store = build_store(target.storage_path, key, [p for p, _ in readable],
                                target.image_size, target.channels, progress=decoding,
                                map_chunks=map_chunks)
    return store, [(d, store.bad.get(p, r) if d is not None else r)
                   for p, (d, r) in zip(index.paths, found)]


def validate_images(index: ImageIndex, on_bad_image: str = "skip", min_per_class: int = 3,
                    progress: Callable[[int, int], None] | None = None,
                    decode_to: DecodeTarget | None = None,
                    decoding: Callable[[int, int], None] | None = None) -> ValidatedImages:
    """`min_per_class` is how many images a class needs to appear in every split;
    `progress(done, total)` is called as images are checked (with `decode_to`: read and
    hashed; `decoding(done, total)` as the store is built)."""
    keep_paths, keep_labels, digests, skipped = [], [], [], []
    store = None
    # closing: a stop at a bad image (or an error) cancels what is still queued.
    with closing(_checked(index.paths, progress, decode=decode_to is None)) as checked:
        if decode_to is not None:
            store, results = _decoded(index, list(checked), decode_to, decoding)
            checked = iter(results)
        for path, label in zip(index.paths, index.labels):
            digest, reason = next(checked)
            if reason is None:
                keep_paths.append(path)
                keep_labels.append(label)
                digests.append(digest)
                continue
            if on_bad_image == "fail":
                raise DataError(f"unreadable image {path} ({reason}); "
                                "use data.on_bad_image=skip to skip such files")
            skipped.append((path, reason))
    counts = Counter(keep_labels)
    present = [c for i, c in enumerate(index.classes) if counts[i] > 0]
    if len(present) < 2:
        raise DataError(f"need at least 2 classes with readable images under {index.root}, "
                        f"found {len(present)} ({', '.join(present) or 'none'}); expected "
                        "root/<class>/<images>")
    small = [f"{index.classes[i]} ({counts[i]})" for i in range(len(index.classes))
             if counts[i] < min_per_class]
    if small:
        raise DataError(f"classes too small to appear in train, val and test (need >= "
                        f"{min_per_class} readable images each): {', '.join(small)}")
    return ValidatedImages(
        ImageIndex(index.root, keep_paths, keep_labels, index.classes), digests, skipped,
        store)
