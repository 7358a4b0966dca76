"""The train/val/test split by content, the manifest and the data fingerprint.

Images are grouped first (`components.data.copies`: the same bytes, or near-copies by their
perceptual hash), and each group goes to one split, chosen by a hash of the split seed and the
group's key (the smallest sha256 among its members): a copy never lands on both sides of a
split, and adding or removing other images never moves an image from one split to another.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from components.data.copies import CopyGroups, group_copies, near_copy_index
from components.data.ingest import ImageIndex
from components.data.validate import LABEL_CONFLICT, ValidatedImages

SPLITS = ("train", "val", "test")
NEAR_TEST = "near-copy of test image"   # why a training image is left out: its reason's start


def min_images_per_class(val_fraction: float, test_fraction: float) -> int:
    """Images a class needs so that, by the expected counts, it has one in val and in test."""
    return max(3, math.ceil(1 / min(val_fraction, test_fraction)))


@dataclass(frozen=True)
class SplitManifest:
    root: str
    paths: list[str]
    labels: list[int]
    splits: list[str]       # "train" | "val" | "test", aligned with paths
    classes: list[str]
    fingerprint: str
    # The test split alone: equal for two runs that were tested on the same images (also when
    # their training data differ, with data.test_path). "" in manifests from before it.
    test_fingerprint: str = ""
    test_root: str | None = None   # data.test_path's root when the test split came from there
    # Aligned with paths (empty in manifests from before them): each image's sha256, its
    # perceptual hash (16 hex digits, "" unknown) and its group of copies (one split each).
    digests: list[str] = field(default_factory=list)
    phashes: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    # What grouping found (`copies_summary`): groups, exact_copies, near_copies, ...
    copies: dict = field(default_factory=dict)

    def subset(self, split: str) -> tuple[list[str], list[int]]:
        rows = [(p, y) for p, y, s in zip(self.paths, self.labels, self.splits) if s == split]
        return [p for p, _ in rows], [y for _, y in rows]

    def counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in SPLITS}

    def group_keys(self) -> dict[str, str]:
        """path -> its group's key (the smallest sha256 among the group's members): what k-fold
        CV keeps together (`kfold_rows`). Empty for a manifest from before groups."""
        if not (self.digests and self.groups):
            return {}
        smallest: dict[int, str] = {}
        for g, d in zip(self.groups, self.digests):
            smallest[g] = min(smallest.get(g, d), d)
        return {p: smallest[g] for p, g in zip(self.paths, self.groups)}

    def save_csv(self, path: str | Path) -> Path:
        """Columns path,label,split,sha256,phash,group with the label as the class name (the
        last three empty for a manifest from before them)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        n = len(self.paths)
        extra = zip(self.digests or [""] * n, self.phashes or [""] * n,
                    self.groups or [""] * n)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split", "sha256", "phash", "group"])
            for p, y, s, (d, h, g) in zip(self.paths, self.labels, self.splits, extra):
                w.writerow([p, self.classes[y], s, d, h, g])
        return path

    def save(self, folder: str | Path) -> list[Path]:
        """split_manifest.csv (one row per image) and manifest.json (root, classes in label
        order, fingerprints, the copies summary): enough to rebuild this manifest with
        `load`."""
        folder = Path(folder)
        meta = folder / "manifest.json"
        csv_path = self.save_csv(folder / "split_manifest.csv")
        meta.write_text(json.dumps({"root": self.root, "classes": self.classes,
                                    "fingerprint": self.fingerprint,
                                    "test_fingerprint": self.test_fingerprint,
                                    "test_root": self.test_root, "copies": self.copies},
                                   indent=1))
        return [csv_path, meta]

    @classmethod
    def load(cls, folder: str | Path) -> SplitManifest:
        """A saved manifest; one saved before digests and groups (a CSV of path,label,split
        only) loads with those lists empty."""
        folder = Path(folder)
        meta = json.loads((folder / "manifest.json").read_text())
        lookup = {c: i for i, c in enumerate(meta["classes"])}
        with (folder / "split_manifest.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))

        def column(name: str) -> list[str]:   # [] when a manifest predates the column
            values = [r.get(name) or "" for r in rows]
            return values if any(values) else []

        return cls(meta["root"], [r["path"] for r in rows], [lookup[r["label"]] for r in rows],
                   [r["split"] for r in rows], list(meta["classes"]), meta["fingerprint"],
                   meta.get("test_fingerprint", ""), meta.get("test_root"),
                   digests=column("sha256"), phashes=column("phash"),
                   groups=[int(g) for g in column("group")],
                   copies=dict(meta.get("copies") or {}))


def compute_fingerprint(root: str, paths, digests, labels, splits, classes) -> str:
    """sha256 over (path relative to the root, file-bytes hash, class name, split), sorted:
    the same images, labels and split give the same fingerprint wherever the data is mounted."""
    h = hashlib.sha256()
    rows = sorted((os.path.relpath(p.split("://", 1)[-1], root.split("://", 1)[-1]), d,
                   classes[y], s)
                  for p, d, y, s in zip(paths, digests, labels, splits))
    for row in rows:
        h.update("\t".join(row).encode() + b"\n")
    return h.hexdigest()


def _near_copy_distance(given: int | None) -> int:
    if given is not None:
        return given
    from components.config import DataConfig  # the one place the default is set

    return DataConfig.near_copy_distance


def _hashed(*parts) -> int:
    """64 bits of sha256 over `parts`: the same parts, the same number, on any machine."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:16], 16)


def _unit(*parts) -> float:
    return _hashed(*parts) / 2**64


def split_dataset(images: ValidatedImages, val_fraction: float, test_fraction: float,
                  seed: int, test_images: ValidatedImages | None = None,
                  near_copy_distance: int | None = None) -> SplitManifest:
    """Train/val/test of `images` by group of copies (`near_copy_distance`: the pHash bits
    two near-copies may differ in; default data.near_copy_distance's), each group's split
    drawn from a hash of `seed` (data.split_seed) and its key. With `test_images`
    (data.test_path) those are the test split, whatever `test_fraction` says, and `images`
    are split into train and val only (less any near-copy of a test image,
    `drop_near_copies_of_test`): later runs over more or other training data are tested on
    the same images."""
    distance = _near_copy_distance(near_copy_distance)
    if test_images is not None:
        images = drop_near_copies_of_test(images, test_images, distance)
    idx = images.index
    copies = group_copies(images.digests, _phashes(images), distance)
    test_share = test_fraction if test_images is None else 0.0
    group_split = assign_splits(copies, idx.labels, seed, val_fraction, test_share)
    splits = [group_split[g] for g in copies.groups]
    paths, labels, digests = list(idx.paths), list(idx.labels), list(images.digests)
    phashes, groups = _phashes(images), list(copies.groups)
    found = [(copies, images)]
    if test_images is None:
        test = [i for i, s in enumerate(splits) if s == "test"]
        test_rows = ([paths[i] for i in test], [digests[i] for i in test],
                     [labels[i] for i in test])
        test_root = idx.root
    else:
        test_rows = _test_rows(test_images, idx.classes, images.digests)
        test_root = test_images.index.root
        test_copies = group_copies(test_images.digests, _phashes(test_images), distance)
        found.append((test_copies, test_images))
        paths += test_rows[0]
        digests += test_rows[1]
        labels += test_rows[2]
        splits += ["test"] * len(test_rows[0])
        phashes += _phashes(test_images)
        groups += [g + len(copies.keys) for g in test_copies.groups]
    fp = compute_fingerprint(idx.root, idx.paths, images.digests, idx.labels,
                             splits[:len(idx)], idx.classes)
    test_fp = compute_fingerprint(test_root, test_rows[0], test_rows[1], test_rows[2],
                                  ["test"] * len(test_rows[0]), idx.classes)
    if test_images is not None:   # the training data and the separate test set together
        fp = hashlib.sha256(f"{fp}\ntest:{test_fp}".encode()).hexdigest()
    summary = copies_summary(found, distance)
    return SplitManifest(idx.root, paths, labels, splits, list(idx.classes), fp, test_fp,
                         None if test_images is None else test_root, digests,
                         phashes, groups, summary)


def _phashes(images: ValidatedImages) -> list[str]:
    return list(images.phashes) or [""] * len(images.index)


def copies_summary(found: list[tuple[CopyGroups, ValidatedImages]], distance: int) -> dict:
    """What grouping found, over the training data and a separate test set together (the
    files left out are counted from the reasons they were skipped for)."""
    reasons = [r for _, v in found for _, r in v.skipped]
    return {"groups": sum(len(c.keys) for c, _ in found),
            "exact_copies": sum(c.exact_copies for c, _ in found),
            "near_copies": sum(c.near_copies for c, _ in found),
            "label_conflicts": sum(v.label_conflicts for _, v in found),
            "label_conflict_files": sum(r.endswith(LABEL_CONFLICT) for r in reasons),
            "images_in_multi_image_groups": sum(c.in_multi_image_groups() for c, _ in found),
            "near_copies_of_test_dropped": sum(r.startswith(NEAR_TEST) for r in reasons),
            "near_copy_distance": distance}


def assign_splits(copies: CopyGroups, labels: list[int], seed: int, val_fraction: float,
                  test_fraction: float) -> list[str]:
    """Each group's split: u = hash(seed, group key) in [0, 1); test below test_fraction, val
    below test_fraction + val_fraction, else train. A class left with no val (or no test)
    image gets its train group of smallest u moved there: deterministic, and needed only by
    classes of a few groups."""
    u = [_unit(seed, key) for key in copies.keys]
    split = ["test" if x < test_fraction else "val" if x < test_fraction + val_fraction
             else "train" for x in u]
    of_class: dict[int, set[int]] = {}
    for g, y in zip(copies.groups, labels):
        of_class.setdefault(y, set()).add(g)
    wanted = [s for s, share in (("val", val_fraction), ("test", test_fraction)) if share > 0]
    for y in sorted(of_class):
        for s in wanted:
            if any(split[g] == s for g in of_class[y]):
                continue
            train = sorted((g for g in of_class[y] if split[g] == "train"), key=u.__getitem__)
            if len(train) >= 2:   # the class keeps a training group
                split[train[0]] = s
    return split


def drop_near_copies_of_test(images: ValidatedImages, test_images: ValidatedImages,
                             distance: int) -> ValidatedImages:
    """`images` less each one whose pHash is within `distance` bits of a data.test_path image:
    moved to `skipped` ("near-copy of test image X"), so training never sees a test picture.
    Exact copies are left in: `split_dataset` refuses those (a test set that holds training
    files is a mistake to fix, a near-copy may be a coincidence). Running it twice drops
    nothing more."""
    if distance <= 0 or not images.phashes or not test_images.phashes:
        return images
    index = near_copy_index(test_images.phashes, distance)
    same_bytes = set(test_images.digests)
    keep, skipped = [], []
    for i, (p, d, h) in enumerate(zip(images.index.paths, images.digests, images.phashes)):
        j = None if d in same_bytes else index.find(h)
        if j is None:
            keep.append(i)
        else:
            skipped.append((p, f"{NEAR_TEST} {test_images.index.paths[j]}"))
    if not skipped:
        return images
    idx = images.index
    return dataclasses.replace(
        images, index=ImageIndex(idx.root, [idx.paths[i] for i in keep],
                                 [idx.labels[i] for i in keep], idx.classes),
        digests=[images.digests[i] for i in keep], phashes=[images.phashes[i] for i in keep],
        skipped=images.skipped + skipped)


def _test_rows(test: ValidatedImages, classes: list[str], train_digests: list[str]):
    """data.test_path's images as (paths, digests, labels in the training data's classes).
    A class the training data lacks, or a test file whose bytes are also a training or
    validation image, is a DataError: such a test set would not measure what it claims."""
    from components.data.ingest import DataError

    lookup = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(test.index.classes) - set(lookup))
    if unknown:
        raise DataError(f"data.test_path={test.index.root} has classes the training data "
                        f"(data.path) lacks: {', '.join(unknown)}")
    seen = set(train_digests)
    shared = [p for p, d in zip(test.index.paths, test.digests) if d in seen]
    if shared:
        raise DataError(f"{len(shared)} images of data.test_path are also in data.path (same "
                        f"bytes), e.g. {shared[0]}: a test image must never be trained on")
    labels = [lookup[test.index.classes[y]] for y in test.index.labels]
    return list(test.index.paths), list(test.digests), labels


def kfold_rows(train_rows: tuple[list[str], list[int]], val_rows: tuple[list[str], list[int]],
               k: int, seed: int, group_keys: Mapping[str, str] | None = None,
               ) -> list[tuple[tuple[list[str], list[int]], tuple[list[str], list[int]]]]:
    """k folds over train+val (the test split stays untouched): [(train, val)]. A group's fold
    is a hash of (seed, "fold", its key) mod k: the images of a group (`group_keys`, path ->
    key: `SplitManifest.group_keys()`) share a fold, and adding images never moves the others
    to another fold. Without a key an image is a group of its own, keyed by its path. A fold
    left without a class gets, from the fold holding most of that class's groups, the one of
    smallest hash (classes of fewer than k groups stay out of some folds)."""
    paths = list(train_rows[0]) + list(val_rows[0])
    labels = list(train_rows[1]) + list(val_rows[1])
    keys = [(group_keys or {}).get(p, p) for p in paths]
    u = {key: _hashed(seed, "fold", key) for key in keys}
    fold = {key: x % k for key, x in u.items()}
    of_class: dict[int, set[str]] = {}
    for key, y in zip(keys, labels):
        of_class.setdefault(y, set()).add(key)
    for y in sorted(of_class):
        for f in range(k):
            members = sorted(of_class[y], key=u.__getitem__)
            if len(members) < k or any(fold[m] == f for m in members):
                continue
            count = {g: sum(fold[m] == g for m in members) for g in range(k)}
            donor = max(range(k), key=lambda g: (count[g], -g))
            fold[next(m for m in members if fold[m] == donor)] = f
    folds = []
    for f in range(k):
        va = [i for i, key in enumerate(keys) if fold[key] == f]
        tr = [i for i, key in enumerate(keys) if fold[key] != f]
        folds.append((([paths[i] for i in tr], [labels[i] for i in tr]),
                      ([paths[i] for i in va], [labels[i] for i in va])))
    return folds
