"""Stratified, seeded train/val/test split; the manifest and the data fingerprint."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import train_test_split

from components.data.validate import ValidatedImages

SPLITS = ("train", "val", "test")


def min_images_per_class(val_fraction: float, test_fraction: float) -> int:
    """Images a class needs so a stratified split can put at least one in val and in test."""
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
    # The stores its images were decoded into (components.data.preprocessed), if any: where
    # trials read them. Not saved with the manifest (the run's tags say where they are).
    decoded: tuple = ()

    def subset(self, split: str) -> tuple[list[str], list[int]]:
        rows = [(p, y) for p, y, s in zip(self.paths, self.labels, self.splits) if s == split]
        return [p for p, _ in rows], [y for _, y in rows]

    def counts(self) -> dict[str, int]:
        return {s: self.splits.count(s) for s in SPLITS}

    def save_csv(self, path: str | Path) -> Path:
        """Columns path,label,split with the label as the class name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "label", "split"])
            for p, y, s in zip(self.paths, self.labels, self.splits):
                w.writerow([p, self.classes[y], s])
        return path

    def save(self, folder: str | Path) -> list[Path]:
        """split_manifest.csv (one row per image) and manifest.json (root, classes in label
        order, fingerprint): enough to rebuild this manifest with `load`."""
        folder = Path(folder)
        meta = folder / "manifest.json"
        csv_path = self.save_csv(folder / "split_manifest.csv")
        meta.write_text(json.dumps({"root": self.root, "classes": self.classes,
                                    "fingerprint": self.fingerprint,
                                    "test_fingerprint": self.test_fingerprint,
                                    "test_root": self.test_root}, indent=1))
        return [csv_path, meta]

    @classmethod
    def load(cls, folder: str | Path) -> SplitManifest:
        folder = Path(folder)
        meta = json.loads((folder / "manifest.json").read_text())
        lookup = {c: i for i, c in enumerate(meta["classes"])}
        with (folder / "split_manifest.csv").open(newline="") as f:
            rows = list(csv.DictReader(f))
        return cls(meta["root"], [r["path"] for r in rows], [lookup[r["label"]] for r in rows],
                   [r["split"] for r in rows], list(meta["classes"]), meta["fingerprint"],
                   meta.get("test_fingerprint", ""), meta.get("test_root"))


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


def split_dataset(images: ValidatedImages, val_fraction: float, test_fraction: float,
                  seed: int, test_images: ValidatedImages | None = None) -> SplitManifest:
    """Stratified train/val/test of `images` with `seed` (data.split_seed). With `test_images`
    (data.test_path) those are the test split, whatever `test_fraction` says, and `images`
    are split into train and val only: later runs over more or other training data are
    tested on the same images."""
    idx = images.index
    order = list(range(len(idx)))
    if test_images is None:
        rest, test = train_test_split(order, test_size=test_fraction, random_state=seed,
                                      stratify=idx.labels)
        val_share = val_fraction / (1 - test_fraction)
    else:
        rest, test, val_share = order, [], val_fraction
    rest_labels = [idx.labels[i] for i in rest]
    train, val = train_test_split(rest, test_size=val_share, random_state=seed,
                                  stratify=rest_labels)
    split_of = {i: "train" for i in train} | {i: "val" for i in val} | {i: "test" for i in test}
    splits = [split_of[i] for i in order]
    paths, labels, digests = list(idx.paths), list(idx.labels), list(images.digests)
    if test_images is None:
        test_rows = ([idx.paths[i] for i in test], [images.digests[i] for i in test],
                     [idx.labels[i] for i in test])
        test_root = idx.root
    else:
        test_rows = _test_rows(test_images, idx.classes, images.digests)
        test_root = test_images.index.root
        paths += test_rows[0]
        digests += test_rows[1]
        labels += test_rows[2]
        splits += ["test"] * len(test_rows[0])
    fp = compute_fingerprint(idx.root, idx.paths, images.digests, idx.labels,
                             splits[:len(idx)], idx.classes)
    test_fp = compute_fingerprint(test_root, test_rows[0], test_rows[1], test_rows[2],
                                  ["test"] * len(test_rows[0]), idx.classes)
    if test_images is not None:   # the training data and the separate test set together
        fp = hashlib.sha256(f"{fp}\ntest:{test_fp}".encode()).hexdigest()
    decoded = tuple(v.decoded for v in (images, test_images)
                    if v is not None and v.decoded is not None)
    return SplitManifest(idx.root, paths, labels, splits, list(idx.classes), fp, test_fp,
                         None if test_images is None else test_root, decoded)


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
               k: int, seed: int) -> list[tuple[tuple[list[str], list[int]],
                                             tuple[list[str], list[int]]]]:
    """Stratified k folds over train+val (the test split stays untouched): [(train, val)]."""
    from sklearn.model_selection import StratifiedKFold

    paths = list(train_rows[0]) + list(val_rows[0])
    labels = list(train_rows[1]) + list(val_rows[1])
    folds = []
    for tr, va in StratifiedKFold(k, shuffle=True, random_state=seed).split(paths, labels):
        folds.append((([paths[i] for i in tr], [labels[i] for i in tr]),
                      ([paths[i] for i in va], [labels[i] for i in va])))
    return folds
