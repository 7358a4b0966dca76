"""Check that every indexed image decodes; skip (and count) or fail on bad ones.

With a decode target (`DecodeTarget`: where the run stores data, the training size and
channels) the check is the decode that trials use: each file is read and hashed, and the
images are decoded once into a store of decoded images (`components.data.preprocessed`), or
not at all when a store of the same files at that size exists already.

Each kept image also gets its perceptual hash (`components.data.copies`: from the store's rows,
or from the decode that checked it), and the same bytes filed under two classes are left out:
such an image would be trained on as one class and tested as the other."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field

from components import storage
from components.data.copies import phash_image, phash_rows
from components.data.ingest import DataError, ImageIndex, open_file
from components.data.preprocessed import (
    DecodedImages,
    RowReader,
    build_store,
    map_on_threads,
    open_store,
    store_key,
)
from components.data.preprocessed import store_location as _store_location
from components.imaging import open_image
from components.storage import StorageError

__all__ = ["DataError", "DecodeTarget", "ValidatedImages", "check_image", "image_signatures",
           "validate_images"]

# The size image_signatures decodes at: a JPEG is decoded at a reduced scale (fast), and the
# hash (taken at 32 px) differs from the one of a full decode by a bit or two at most.
SIGNATURE_SIZE = 64
# Below this training size a store's rows are too coarse to hash: a re-encoded copy of a photo
# trained at 16 px drifted past the near-copy distance (tests/e2e/test_promote.py). Such runs
# hash a SIGNATURE_SIZE decode of each file as it is read, like promote's signatures.
HASH_MIN_SIZE = 32
_STORE_BLOCK_BYTES = 16 * 2**20   # rows of a store hashed at once, per thread
LABEL_CONFLICT = ": label conflict"   # how a skipped file's reason ends when it is one


@dataclass(frozen=True)
class ValidatedImages:
    index: ImageIndex                      # only readable images, classes unchanged
    digests: list[str]                     # sha256 of each kept file's bytes (fingerprint)
    skipped: list[tuple[str, str]]         # (path, reason)
    decoded: DecodedImages | None = None   # the store, with a DecodeTarget
    # Each kept image's perceptual hash (16 hex digits, components.data.copies; "" unknown),
    # aligned with index.paths.
    phashes: list[str] = field(default_factory=list)
    label_conflicts: int = 0   # contents filed under two or more classes (their files skipped)


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
    digest, reason, _ = _read(path, decode)
    return digest, reason


def _read(path: str, decode: bool = True, hash_only: bool = False
          ) -> tuple[str | None, str | None, str]:
    """check_image, and the perceptual hash of the decoded image ("" without `decode`, unless
    `hash_only`: a SIGNATURE_SIZE decode for the hash alone; the store's build judges the
    file)."""
    data, reason = _read_file(path)
    if data is None:
        return None, reason, ""
    phash = ""
    try:
        if not data:
            return None, "empty file", ""
        if decode:
            # The served model's decoder, with its limits: a decompression bomb or a format
            # it refuses is a skipped, counted image here too. load() decodes every byte of
            # the first frame: it catches truncated files that verify() lets pass.
            with open_image(data) as img:
                phash = phash_image(img)   # the decoded pixels are at hand: no second decode
        elif hash_only:
            phash = _phash_or_none(data) or ""
    except Exception as e:  # PIL raises many types for broken files
        return None, f"{type(e).__name__}: {e}", ""
    return hashlib.sha256(data).hexdigest(), None, phash


def _read_file(path: str) -> tuple[bytes | None, str | None]:
    """(the file's bytes, None) or (None, why it cannot be read)."""
    try:
        with open_file(path) as f:
            return f.read(), None
    except FileNotFoundError as e:
        return None, f"FileNotFoundError: {e}"
    except OSError as e:
        if storage.is_uri(path):
            # Object storage that fails to answer (throttling, network, expired credentials)
            # is not a bad image: skipping would quietly change the data and its fingerprint.
            raise StorageError(f"reading {path} failed: {str(e).splitlines()[0]}") from e
        return None, f"{type(e).__name__}: {e}"


def _phash_or_none(data: bytes) -> str | None:
    try:
        with open_image(data, SIGNATURE_SIZE) as img:
            return phash_image(img)
    except Exception:  # PIL raises many types for broken files
        return None


def _signature(path: str) -> tuple[str | None, str | None]:
    digest, _, phash = _read(path, decode=False, hash_only=True)
    return digest, phash or None


def image_signatures(paths: list[str]) -> tuple[list[str | None], list[str | None]]:
    """Each file's sha256 and 16-hex-digit perceptual hash (decoded at SIGNATURE_SIZE): what
    promote matches against the images a model trained or was selected on. The sha256 is None
    for a file that cannot be read (or is empty), the hash None also for one that does not
    decode; object storage that fails to answer raises StorageError (a guess would change the
    evidence). On a few threads, like the validate step."""
    digests, phashes = [], []
    with closing(_threaded(_signature, paths, None)) as results:
        for digest, phash in results:
            digests.append(digest)
            phashes.append(phash)
    return digests, phashes


def _threaded(fn: Callable, paths: list[str], progress: Callable[[int, int], None] | None):
    """fn over `paths`, in order, on a few threads (decoding and object-storage reads release
    the GIL); `progress(done, total)` after each image."""
    threads = min(8, (os.cpu_count() or 1) * 2)
    pool = ThreadPoolExecutor(threads)
    window: deque = deque()   # a bounded number of images in flight, whatever the folder's size
    todo = iter(paths)
    try:
        for path in itertools.islice(todo, threads * 4):
            window.append(pool.submit(fn, path))
        done = 0
        while window:
            result = window.popleft().result()
            for path in itertools.islice(todo, 1):
                window.append(pool.submit(fn, path))
            done += 1
            if progress is not None:
                progress(done, len(paths))
            yield result
    finally:  # a failure stops at the first bad image: the rest is not checked
        pool.shutdown(wait=False, cancel_futures=True)


def _decoded(index: ImageIndex, found: list[tuple[str | None, str | None, str]],
             target: DecodeTarget, decoding: Callable[[int, int], None] | None):
    """The store of the readable files (built now, or found), and each file's reason."""
    readable = [(p, d) for p, (d, _, _) in zip(index.paths, found) if d is not None]
    key = store_key(index.root, [p for p, _ in readable], [d for _, d in readable],
                    target.image_size, target.channels)
    store = open_store(_store_location(target.storage_path, key))
    if store is None:
        with target.cluster() if target.cluster else contextlib.nullcontext() as map_chunks:
            store = build_store(target.storage_path, key, [p for p, _ in readable],
                                target.image_size, target.channels, progress=decoding,
                                map_chunks=map_chunks)
    return store, [(d, store.bad.get(p, r) if d is not None else r, h)
                   for p, (d, r, h) in zip(index.paths, found)]


def store_phashes(store: DecodedImages) -> dict[str, str]:
    """The perceptual hash of every row of `store` that decoded, by path: read in blocks of
    rows (never the whole store at once), hashed on this machine's threads."""
    reader = RowReader(store)
    try:
        reader.rows(0, 0)   # opens the file here, once, before the threads share the reader
        step = max(1, _STORE_BLOCK_BYTES // store.row_bytes)
        blocks = [(start, min(start + step, len(store.paths)))
                  for start in range(0, len(store.paths), step)]
        hashes: list[str] = []
        for _, block in map_on_threads(lambda a, b: phash_rows(reader.rows(a, b)), blocks):
            hashes += block
    finally:
        reader.close()
    return {p: h for p, h in zip(store.paths, hashes) if p not in store.bad}


def _without_label_conflicts(kept: list[tuple[str, int, str, str]], classes: list[str]):
    """`kept` (path, label, digest, phash) less every file whose bytes another file under
    another class has: (the rest, their (path, reason) rows, the conflicting contents)."""
    by_digest: dict[str, list[int]] = {}
    for i, (_, _, digest, _) in enumerate(kept):
        by_digest.setdefault(digest, []).append(i)
    reasons: dict[int, str] = {}
    contents = 0
    for members in by_digest.values():
        if len({kept[i][1] for i in members}) < 2:
            continue
        contents += 1
        for i in members:
            other = next(j for j in members if kept[j][1] != kept[i][1])
            reasons[i] = (f"same bytes as {kept[other][0]} filed under class "
                          f"{classes[kept[other][1]]}{LABEL_CONFLICT}")
    rest = [k for i, k in enumerate(kept) if i not in reasons]
    return rest, [(kept[i][0], reasons[i]) for i in sorted(reasons)], contents


def validate_images(index: ImageIndex, on_bad_image: str = "skip", min_per_class: int = 3,
                    progress: Callable[[int, int], None] | None = None,
                    decode_to: DecodeTarget | None = None,
                    decoding: Callable[[int, int], None] | None = None) -> ValidatedImages:
    """`min_per_class` is how many images a class needs to appear in every split;
    `progress(done, total)` is called as images are checked (with `decode_to`: read and
    hashed; `decoding(done, total)` as the store is built). Files with the same bytes under
    two classes are skipped (a label conflict), whatever `on_bad_image` says: they are
    readable, and no choice of one label would be right."""
    kept, skipped, store = [], [], None
    # closing: a stop at a bad image (or an error) cancels what is still queued.
    coarse = decode_to is not None and decode_to.image_size < HASH_MIN_SIZE
    read = functools.partial(_read, decode=decode_to is None, hash_only=coarse)
    with closing(_threaded(read, index.paths, progress)) as checked:
        results: Iterator = checked
        if decode_to is not None:
            store, found = _decoded(index, list(checked), decode_to, decoding)
            results = iter(found)
        for path, label in zip(index.paths, index.labels):
            digest, reason, phash = next(results)
            if reason is None:
                kept.append((path, label, digest, phash))
                continue
            if on_bad_image == "fail":
                raise DataError(f"unreadable image {path} ({reason}); "
                                "use data.on_bad_image=skip to skip such files")
            skipped.append((path, reason))
    if store is not None and not coarse:
        hashes = store_phashes(store)
        kept = [(p, y, d, hashes.get(p, "")) for p, y, d, _ in kept]
    kept, conflicts, contents = _without_label_conflicts(kept, index.classes)
    _check_classes(index, [y for _, y, _, _ in kept], min_per_class)
    return ValidatedImages(
        ImageIndex(index.root, [k[0] for k in kept], [k[1] for k in kept], index.classes),
        [k[2] for k in kept], skipped + conflicts, store, [k[3] for k in kept], contents)


def _check_classes(index: ImageIndex, labels: list[int], min_per_class: int) -> None:
    counts = Counter(labels)
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
