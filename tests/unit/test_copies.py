"""Copies, near-copies and label conflicts: planted in a folder of photo-like images, found by
the real validate and split, checked against hashes this test computes itself."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw

from components.config import DataConfig
from components.data import (
    image_signatures,
    index_image_folder,
    near_copy_index,
    split_dataset,
    validate_images,
)
from components.data.copies import distance, group_copies, near_pairs
from components.data.validate import DecodeTarget
from tests.conftest import log_lines

CLASSES = ("cat", "dog")
DEFAULT = DataConfig.near_copy_distance


def _photo(seed: int) -> Image.Image:
    """A photo-like image: a smooth colour field, shapes, mild grain (what a re-encode or a
    resize changes a little, and two different pictures differ in)."""
    rng = np.random.default_rng(seed)
    w, h = (int(v) for v in rng.integers(128, 193, 2))
    img = Image.fromarray(rng.integers(40, 200, (3, 4, 3), dtype=np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 7))):
        cx, cy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        r = rng.uniform(0.05, 0.2) * min(w, h)
        box = [cx - r, cy - r * rng.uniform(0.6, 1.4), cx + r, cy + r * rng.uniform(0.6, 1.4)]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return ImageChops.add(img, Image.effect_noise((w, h), 4).convert("RGB"), 1.0, -128)


def _jpeg(img: Image.Image, quality: int) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _near_copy(data: bytes) -> bytes:
    """Resized to 90% and saved again at JPEG quality 70."""
    with Image.open(io.BytesIO(data)) as img:
        return _jpeg(img.resize((round(img.width * 0.9), round(img.height * 0.9)),
                                Image.Resampling.BILINEAR), 70)


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def _plant(root: Path) -> dict:
    """80 distinct images in 2 classes, 30 byte-identical copies under other names, 15
    near-copies (3 of them filed under the other class), 3 images filed under both classes."""
    originals = [_write(root / CLASSES[i % 2] / f"img{i:03d}.jpg", _jpeg(_photo(i), 90))
                 for i in range(80)]
    exact = [(originals[i], _write(root / CLASSES[i % 2] / "more" / f"copy{i:03d}.jpg",
                                   Path(originals[i]).read_bytes())) for i in range(30)]
    near = [(originals[i], _write(root / CLASSES[(i + (i < 43)) % 2] / f"near{i:03d}.jpg",
                                  _near_copy(Path(originals[i]).read_bytes())))
            for i in range(40, 55)]
    conflicts = []
    for j in range(3):
        data = _jpeg(_photo(1000 + j), 90)
        conflicts += [_write(root / c / f"conflict{j}.jpg", data) for c in CLASSES]
    return {"originals": originals, "exact": exact, "near": near, "conflicts": conflicts}


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("copies") / "photos"
    return root, _plant(root)


def _validated(root: Path, store: Path | None):
    target = None if store is None else DecodeTarget(str(store), 32, 3)
    return validate_images(index_image_folder(root), decode_to=target)


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("store", [False, True], ids=["from-files", "from-store"])
def test_copies_stay_in_one_split_and_conflicts_are_left_out(planted, tmp_path, store):
    root, plan = planted
    v = _validated(root, tmp_path / "ray" if store else None)
    assert (v.decoded is not None) == store
    m = split_dataset(v, 0.15, 0.15, seed=0)
    split_of = dict(zip(m.paths, m.splits))
    # the manifest's digests are the files' own; one split per content, checked independently
    assert m.digests == [_sha256(p) for p in m.paths]
    by_content: dict[str, set[str]] = {}
    for p, s in split_of.items():
        by_content.setdefault(_sha256(p), set()).add(s)
    assert all(len(s) == 1 for s in by_content.values())
    assert all(split_of[a] == split_of[b] for a, b in plan["exact"] + plan["near"])
    assert all(m.groups[m.paths.index(a)] == m.groups[m.paths.index(b)]
               for a, b in plan["exact"] + plan["near"])
    # the same bytes under two classes: under no label, skipped with the reason
    assert not set(plan["conflicts"]) & set(m.paths)
    reasons = dict(v.skipped)
    for p in plan["conflicts"]:
        other = "dog" if "/cat/" in p else "cat"
        assert re.fullmatch(rf"same bytes as .*/{other}/conflict\d\.jpg filed under class "
                            rf"{other}: label conflict", reasons[p])
    assert m.copies == {"groups": 80, "exact_copies": 30, "near_copies": 15,
                        "label_conflicts": 3, "label_conflict_files": 6,
                        "images_in_multi_image_groups": 90, "near_copies_of_test_dropped": 0,
                        "near_copy_distance": DEFAULT}
    assert len(m.paths) == 125 and all(len(h) == 16 for h in m.phashes)
    # every planted near-copy within the default distance of its original
    phash = dict(zip(m.paths, m.phashes))
    assert max(distance(phash[a], phash[b]) for a, b in plan["near"]) <= DEFAULT


def test_the_split_stays_put_when_images_are_added(planted, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(planted[0], root)
    before = split_dataset(_validated(root, None), 0.15, 0.15, seed=0)
    for i in range(30):
        _write(root / CLASSES[i % 2] / f"new{i:03d}.jpg", _jpeg(_photo(2000 + i), 90))
    after = split_dataset(_validated(root, None), 0.15, 0.15, seed=0)
    assert len(after.paths) == len(before.paths) + 30
    was, now = dict(zip(before.paths, before.splits)), dict(zip(after.paths, after.splits))
    # earlier test images all still in test, no earlier train or val image moved
    assert all(now[p] == s for p, s in was.items())
    assert after.test_fingerprint != before.test_fingerprint or "test" not in {
        now[p] for p in set(now) - set(was)}


def test_a_near_copy_of_a_test_image_is_left_out_of_training(planted, tmp_path):
    root, plan = planted
    test = tmp_path / "test"
    kept = plan["originals"][60]
    _write(test / "cat" / "shot.jpg", _near_copy(Path(kept).read_bytes()))
    for i in range(4):
        _write(test / CLASSES[i % 2] / f"t{i}.jpg", _jpeg(_photo(3000 + i), 90))
    held_out = validate_images(index_image_folder(test), min_per_class=1)
    m = split_dataset(_validated(root, None), 0.15, 0.15, 0, held_out)
    assert kept not in m.paths and m.counts()["test"] == 5
    assert m.copies["near_copies_of_test_dropped"] == 1
    from components.data import drop_near_copies_of_test

    images = drop_near_copies_of_test(_validated(root, None), held_out, DEFAULT)
    assert dict(images.skipped)[kept] == f"near-copy of test image {test / 'cat' / 'shot.jpg'}"


def test_image_signatures_and_the_near_copy_index(planted, tmp_path):
    root, plan = planted
    (original, copy), *_ = plan["near"]
    broken = _write(tmp_path / "broken.jpg", b"not an image")
    digests, phashes = image_signatures([original, copy, broken, str(tmp_path / "gone.jpg")])
    assert digests[:3] == [_sha256(original), _sha256(copy), _sha256(broken)]
    assert digests[3] is None and phashes[2:] == [None, None]
    assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in phashes[:2])
    index = near_copy_index([phashes[0], "", None], DEFAULT)
    assert index.matches(phashes[1]) and not index.matches(None)
    far = f"{int(phashes[0], 16) ^ (2 ** (DEFAULT + 1) - 1):016x}"   # DEFAULT + 1 bits away
    assert not index.matches(far) and near_copy_index([far], DEFAULT + 1).matches(phashes[0])


def test_banded_search_finds_every_close_pair():
    """The bands (pigeonhole) against comparing all pairs, with planted pairs at 0..d+2 bits."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2)
    flips = [sum(1 << int(b) for b in rng.choice(64, k, replace=False)) for k in range(7)]
    values = np.unique(np.concatenate([base, base[:7] ^ np.array(flips, np.uint64)]))
    for d in (1, 2, 4, 5):
        found = {(min(a, b), max(a, b)) for pa, pb in near_pairs(values, d)
                 for a, b in zip(pa.tolist(), pb.tolist())}
        bits = np.bitwise_count(values[:, None] ^ values[None, :])
        expected = {(a, b) for a, b in zip(*np.nonzero(np.triu(bits <= d, 1)))}
        assert found == {(int(a), int(b)) for a, b in expected} and found
    groups = group_copies(["a", "b", "a", "c"], ["0" * 16, "0" * 15 + "3", "", "f" * 16], 2)
    assert groups.groups == [0, 0, 0, 1] and groups.keys == ["a", "c"]
    assert (groups.exact_copies, groups.near_copies) == (1, 1)
    assert group_copies(["a", "b"], ["0" * 16, "0" * 16], 0).near_copies == 0   # 0: bytes only


def test_the_data_step_prints_and_records_the_copies(planted, tmp_path):
    """The issue's folder through the pipeline's own data step: one console line with the
    counts, the same counts as metrics of the run (read back through MlflowClient), and the
    label conflicts in the run's skipped table."""
    from mlflow import MlflowClient

    from pipelines.compose import load_config
    from pipelines.steps import open_record, prepare_data

    root, files = planted
    uri = f"sqlite:///{tmp_path}/m.db"
    cfg = load_config(["data=folder", f"data.path={root}", "data.image_size=32",
                       f"tracking.uri={uri}", f"tracking.artifact_location={tmp_path}/art",
                       f"ray.storage_path={tmp_path}/ray"])
    with log_lines("pipelines.steps") as lines:
        record = open_record(cfg, None, None)
        manifest = prepare_data(cfg, record).manifest
    record.close("FINISHED")
    assert f"  copies: {len(manifest.paths)} images in 80 groups: 30 exact copies, 15 " \
           "near-copies (pHash <= 4 bits), 3 label conflicts (6 files left out); each group " \
           "kept in one split" in lines
    run = MlflowClient(uri).get_run(record.run_id)
    assert {k: run.data.metrics[k] for k in ("data_copy_groups", "data_exact_copies",
                                             "data_near_copies", "data_label_conflicts")} == {
        "data_copy_groups": 80, "data_exact_copies": 30, "data_near_copies": 15,
        "data_label_conflicts": 3}
    skipped = MlflowClient(uri).download_artifacts(record.run_id, "data/skipped_images.tsv",
                                                   str(tmp_path))
    text = Path(skipped).read_text()
    assert all(f"{p}\t" in text for p in files["conflicts"]) and "label conflict" in text
