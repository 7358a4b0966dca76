"""Copies and near-copies: a 64-bit perceptual hash of each image, the groups of images that
show one picture (the same bytes, or hashes a few bits apart), and an index that answers "is
this image a near-copy of one of those?".

The hash (DCT pHash): the image in grey at 32 x 32 whatever its size (a hash taken from a
training store at 32 px and one taken from the file compare), its 2-D DCT, the 8 x 8 lowest
frequencies; a bit per coefficient, set when the coefficient is above the median of the 63
without the DC term. A re-encode or a resize moves a few bits; two different pictures differ
in about half of them. Measured (benchmarks/near_copies.py, docs/data.md): what a distance
catches on photo-like re-encodes and what it merges among the distinct handwritten digits.

Near pairs are found without comparing all pairs: the 64 bits cut into d + 1 bands, two hashes
at most d bits apart agree exactly on at least one band (pigeonhole), so only hashes that share
a band's value are compared.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

HASH_SIDE, LOW = 32, 8
_WEIGHTS = np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)


@functools.cache
def _dct_rows() -> np.ndarray:
    """The orthonormal DCT-II matrix's first LOW rows: only the low frequencies are kept."""
    k = np.arange(LOW)[:, None]
    x = np.arange(HASH_SIDE)[None, :]
    c = np.cos(np.pi * (2 * x + 1) * k / (2 * HASH_SIDE)) * np.sqrt(2 / HASH_SIDE)
    c[0] /= np.sqrt(2)
    return c


def phash_grey(grey: np.ndarray) -> list[str]:
    """(n, 32, 32) grey pixels -> n hashes, 16 hex digits each."""
    c = _dct_rows()
    low = (c @ np.asarray(grey, np.float64) @ c.T).reshape(len(grey), LOW * LOW)
    # The DC term is the mean brightness: left out of the median, it would tilt every bit.
    bits = low > np.median(low[:, 1:], axis=1, keepdims=True)
    values = (bits.astype(np.uint64) * _WEIGHTS).sum(axis=1, dtype=np.uint64)
    return [f"{int(v):016x}" for v in values]


def grey_32(img: Image.Image) -> np.ndarray:
    """Any image -> its (32, 32) grey pixels, by the shared preprocessing (EXIF rotation,
    16-bit scaling, bilinear resize), so every path to a hash sees the same picture."""
    from components.imaging import to_array

    return to_array(img, 1, HASH_SIDE)[:, :, 0]


def phash_image(img: Image.Image) -> str:
    return phash_grey(grey_32(img)[None])[0]


def phash_rows(rows: np.ndarray) -> list[str]:
    """Decoded rows of a store, (n, size, size, channels) uint8 -> n hashes."""
    grey = np.empty((len(rows), HASH_SIDE, HASH_SIDE), np.uint8)
    for i, row in enumerate(rows):
        grey[i] = grey_32(Image.fromarray(row[:, :, 0] if row.shape[-1] == 1 else row))
    return phash_grey(grey)


def distance(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def _bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of each of the d + 1 bands, as equal as 64 bits allow."""
    n = min(max_distance + 1, 64)
    edges = [round(i * 64 / n) for i in range(n + 1)]
    return [(64 - edges[i + 1], (1 << (edges[i + 1] - edges[i])) - 1) for i in range(n)]


def near_pairs(values: np.ndarray, max_distance: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Index pairs (a, b) of `values` (distinct uint64 hashes) at most `max_distance` bits
    apart, in blocks; a pair may come once per band it shares."""
    n = len(values)
    for shift, mask in _bands(max_distance):
        keys = (values >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        # Sorted, equal keys are runs: position p pairs with p + o while the run lasts, so
        # the work is the number of candidate pairs, not n x the longest run.
        active = np.arange(n - 1)
        offset = 1
        while active.size:
            active = active[active + offset < n]
            active = active[sorted_keys[active + offset] == sorted_keys[active]]
            a, b = order[active], order[active + offset]
            close = np.bitwise_count(values[a] ^ values[b]) <= max_distance
            if close.any():
                yield a[close], b[close]
            offset += 1


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        parent = self.parent
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(self, i: int, j: int) -> bool:
        ri, rj = self.find(i), self.find(j)
        if ri == rj:
            return False
        self.parent[max(ri, rj)] = min(ri, rj)
        return True


@dataclass(frozen=True)
class CopyGroups:
    """Images grouped by content: one group per picture, whatever its copies."""

    groups: list[int]        # per image: its group, numbered in order of first member
    keys: list[str]          # per group: the smallest sha256 of its members (its split key)
    exact_copies: int        # images whose bytes an earlier image has (beyond the first)
    near_copies: int         # distinct contents joined to another by a near-copy link

    def in_multi_image_groups(self) -> int:
        sizes = np.bincount(np.asarray(self.groups, np.int64), minlength=len(self.keys))
        return int(sizes[sizes > 1].sum())


def group_copies(digests: Sequence[str], phashes: Sequence[str],
                 max_distance: int) -> CopyGroups:
    """Connected components of exact-copy links (equal sha256) and near-copy links (pHashes
    at most `max_distance` bits apart; 0: exact copies only, no perceptual link). An unknown
    pHash ("") links by bytes only."""
    contents: dict[str, int] = {}
    content_of = [contents.setdefault(d, len(contents)) for d in digests]
    uf = _UnionFind(len(contents))
    if max_distance > 0:
        hashes: dict[str, int] = {}        # a pHash -> the first content that has it
        for c, h in zip(content_of, phashes):
            if h:
                uf.union(hashes.setdefault(h, c), c)
        unique = list(hashes)
        values = np.array([int(h, 16) for h in unique], np.uint64)
        for a, b in near_pairs(values, max_distance):
            for i, j in zip(a.tolist(), b.tolist()):
                uf.union(hashes[unique[i]], hashes[unique[j]])
    number: dict[int, int] = {}
    groups = [number.setdefault(uf.find(c), len(number)) for c in content_of]
    keys: list[str] = [""] * len(number)
    for g, d in zip(groups, digests):
        if not keys[g] or d < keys[g]:
            keys[g] = d
    return CopyGroups(groups, keys, len(digests) - len(contents), len(contents) - len(number))


class NearCopyIndex:
    """pHashes bucketed by band: a lookup compares a hash only with the indexed hashes that
    share one of its bands, the only ones that can be `max_distance` bits close."""

    def __init__(self, phashes: Sequence[str | None], max_distance: int):
        self.max_distance = max_distance
        self.bands = _bands(max_distance)
        # band value -> (hash, position of its first occurrence in `phashes`)
        self.buckets: list[dict[int, list[tuple[int, int]]]] = [{} for _ in self.bands]
        seen: set[str] = set()
        for i, h in enumerate(phashes):
            if not h or h in seen:
                continue
            seen.add(h)
            v = int(h, 16)
            for (shift, mask), bucket in zip(self.bands, self.buckets):
                bucket.setdefault((v >> shift) & mask, []).append((v, i))

    def find(self, phash: str | None) -> int | None:
        """The position (in the indexed list) of a hash at most `max_distance` bits from
        `phash`, or None."""
        if not phash:
            return None
        v = int(phash, 16)
        for (shift, mask), bucket in zip(self.bands, self.buckets):
            for w, i in bucket.get((v >> shift) & mask, ()):
                if (v ^ w).bit_count() <= self.max_distance:
                    return i
        return None

    def matches(self, phash: str | None) -> bool:
        """Whether any indexed hash is at most `max_distance` bits from `phash`."""
        return self.find(phash) is not None


def near_copy_index(phashes: Sequence[str | None], max_distance: int) -> NearCopyIndex:
    """An index of `phashes` ("" or None: left out) for `matches(phash)` lookups."""
    return NearCopyIndex(phashes, max_distance)
