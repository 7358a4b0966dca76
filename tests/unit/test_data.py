from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.data import (
    DataError,
    index_image_folder,
    load_image,
    split_dataset,
    validate_images,
    write_digits_folder,
)
from components.data.split import compute_fingerprint, min_images_per_class
from tests.conftest import log_lines, make_image_folder


def test_index_ignores_hidden_root_and_non_image_files(image_folder):
    index = index_image_folder(image_folder)
    assert index.classes == ["cat", "dog"]
    names = {Path(p).name for p in index.paths}
    assert "notes.txt" not in names and ".hidden.png" not in names
    assert not any(Path(p).parent == image_folder for p in index.paths)
    # upper-case extension is found; corrupt files are still *indexed* (validate skips them)
    assert "001.PNG" in names and "truncated.png" in names and "empty.jpg" in names
    assert len(index) == 20 + 20 + 3


def test_index_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        index_image_folder(tmp_path / "nope")


def test_validate_skips_and_counts_bad_images(image_folder):
    v = validate_images(index_image_folder(image_folder), "skip")
    skipped = {Path(p).name for p, _ in v.skipped}
    assert skipped == {"truncated.png", "empty.jpg", "not_an_image.png"}
    assert len(v.index) == 40 and len(v.digests) == 40


def test_validate_fail_mode_raises(image_folder):
    with pytest.raises(DataError, match="unreadable image"):
        validate_images(index_image_folder(image_folder), "fail")


def test_fewer_than_two_classes_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "one", classes=("only",), corrupt=False)
    with pytest.raises(DataError, match="at least 2 classes"):
        validate_images(index_image_folder(root))


def test_class_too_small_for_every_split_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "small", per_class=20, corrupt=False)
    for f in sorted((root / "dog").iterdir())[2:]:
        f.unlink()
    with pytest.raises(DataError, match=r"dog \(2\)"):
        validate_images(index_image_folder(root), min_per_class=min_images_per_class(.15, .15))


def test_split_is_by_content_disjoint_and_seeded(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=40,
                             corrupt=False)
    v = validate_images(index_image_folder(root))
    m1 = split_dataset(v, 0.2, 0.2, seed=1)
    m2 = split_dataset(v, 0.2, 0.2, seed=1)
    m3 = split_dataset(v, 0.2, 0.2, seed=2)
    assert m1.splits == m2.splits and m1.fingerprint == m2.fingerprint
    assert m1.splits != m3.splits and m1.fingerprint != m3.fingerprint
    assert sum(m1.counts().values()) == 120 and len(set(m1.paths)) == 120
    assert m1.copies["groups"] == 120 and m1.copies["near_copies"] == 0
    for split, share in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        _, labels = m1.subset(split)
        for c in range(3):   # a hash per group, not a stratified shuffle: binomial counts
            assert abs(labels.count(c) - 40 * share) <= 3 * (40 * share * (1 - share)) ** .5


def test_manifest_csv_has_path_label_split_and_content(tmp_path, image_folder):
    m = split_dataset(validate_images(index_image_folder(image_folder)), .15, .15, 0)
    lines = m.save_csv(tmp_path / "m.csv").read_text().splitlines()
    assert lines[0] == "path,label,split,sha256,phash,group"
    assert len(lines) == 41
    _, label, split, digest, phash, group = lines[1].split(",")
    assert label in ("cat", "dog") and split in ("train", "val", "test")
    assert len(digest) == 64 and len(phash) == 16 and int(group) >= 0


def test_manifest_round_trips_and_an_old_one_still_loads(tmp_path, image_folder):
    from components.data.split import SplitManifest

    m = split_dataset(validate_images(index_image_folder(image_folder)), .15, .15, 0)
    m.save(tmp_path / "new")
    loaded = SplitManifest.load(tmp_path / "new")
    assert (loaded.paths, loaded.labels, loaded.splits) == (m.paths, m.labels, m.splits)
    assert (loaded.digests, loaded.phashes, loaded.groups) == (m.digests, m.phashes, m.groups)
    assert loaded.copies == m.copies and loaded.copies["groups"] == 40
    assert loaded.group_keys() == m.group_keys() and len(m.group_keys()) == 40
    # a manifest saved before digests and groups: path,label,split and no copies summary
    old = tmp_path / "old"
    old.mkdir()
    (old / "split_manifest.csv").write_text("path,label,split\n/d/cat/1.png,cat,train\n"
                                            "/d/dog/2.png,dog,test\n")
    (old / "manifest.json").write_text('{"root": "/d", "classes": ["cat", "dog"], '
                                       '"fingerprint": "f"}')
    was = SplitManifest.load(old)
    assert was.splits == ["train", "test"] and was.labels == [0, 1]
    assert (was.digests, was.phashes, was.groups, was.copies) == ([], [], [], {})
    assert was.group_keys() == {}


def test_class_balance_on_the_digits_stays_near_stratified(tmp_path):
    """Each group's split is drawn on its own (what keeps a split put as data grows), so a
    class's count in a split is binomial around the stratified expectation: within 3 standard
    deviations per class, about 2 on average (docs/data.md has the measured numbers)."""
    import numpy as np

    v = validate_images(index_image_folder(write_digits_folder(tmp_path)))
    per_class = np.bincount(v.index.labels)
    m = split_dataset(v, 0.15, 0.15, 0)
    assert m.copies["exact_copies"] == 0 and m.copies["groups"] > 1700
    for split, share in (("val", 0.15), ("test", 0.15)):
        got = np.bincount(m.subset(split)[1], minlength=10)
        sd = np.sqrt(per_class * share * (1 - share))
        assert (np.abs(got - per_class * share) <= 3 * sd).all(), (split, got)
        assert np.abs(got - per_class * share).mean() <= 2 * sd.mean()


def test_fingerprint_depends_on_bytes_labels_and_split_not_location():
    base = dict(root="/data", paths=["/data/a/1.png", "/data/b/2.png"], digests=["x", "y"],
                labels=[0, 1], splits=["train", "test"], classes=["a", "b"])
    fp = compute_fingerprint(**base)
    assert fp == compute_fingerprint(**{**base, "root": "/mnt", "paths": ["/mnt/a/1.png",
                                                                         "/mnt/b/2.png"]})
    assert fp != compute_fingerprint(**{**base, "digests": ["x", "z"]})
    assert fp != compute_fingerprint(**{**base, "labels": [1, 0]})
    assert fp != compute_fingerprint(**{**base, "splits": ["test", "train"]})


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "I;16", "1"])
@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_any_mode_and_size(tmp_path, mode, channels):
    arr = (np.arange(30 * 50) % 256).reshape(30, 50).astype(np.uint8)
    img = Image.fromarray(arr).convert(mode) if mode != "I;16" else \
        Image.fromarray(arr.astype(np.uint16) * 200)
    ext = "tiff" if mode in ("CMYK", "I;16") else "png"
    path = tmp_path / f"x.{ext}"
    img.save(path)
    out = load_image(str(path), channels, 16)
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert out.max() > 200  # 16-bit grey is rescaled, not clipped to white/black


def test_builtin_digits_written_once(tmp_path):
    root = write_digits_folder(tmp_path)
    index = index_image_folder(root)
    assert len(index) == 1797 and index.classes == [str(i) for i in range(10)]
    first = Path(index.paths[0]).stat().st_mtime_ns
    assert write_digits_folder(tmp_path) == root
    assert Path(index.paths[0]).stat().st_mtime_ns == first
    with Image.open(index.paths[0]) as img:
        assert img.size == (8, 8) and img.mode == "L"


def test_csv_manifest_with_relative_and_missing_paths(tmp_path, image_folder):
    from components.data import index_csv_manifest, index_images

    csv = tmp_path / "manifest.csv"
    rows = ["path,label,extra", "images/cat/000.png,cat,x", f"{image_folder}/dog/000.png,dog,y",
            "images/cat/missing.png,cat,z", "images/dog/001.PNG,dog,w"]
    csv.write_text("\n".join(rows) + "\n")
    index = index_images(csv)
    assert index.classes == ["cat", "dog"] and index.labels == [0, 1, 0, 1]
    assert index.paths[0] == str(image_folder / "cat" / "000.png")
    v = validate_images(index, min_per_class=1)
    assert [Path(p).name for p, _ in v.skipped] == ["missing.png"]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(ValueError, match="needs the columns path,label"):
        index_csv_manifest(bad)


def test_kfold_rows_cover_train_and_val_once_each_and_keep_groups_together():
    from components.data.split import kfold_rows

    train = ([f"t{i}" for i in range(40)], [i % 2 for i in range(40)])
    val = ([f"v{i}" for i in range(8)], [i % 2 for i in range(8)])
    # t0..t3 are one group (copies), v0 is a copy of t10
    keys = {**{f"t{i}": "g0" for i in range(4)}, "v0": "k10", "t10": "k10"}
    folds = kfold_rows(train, val, 4, seed=0, group_keys=keys)
    assert len(folds) == 4
    seen = sorted(p for _, (paths, _) in folds for p in paths)
    assert seen == sorted(train[0] + val[0])
    for (tr_paths, tr_labels), (va_paths, va_labels) in folds:
        assert not set(tr_paths) & set(va_paths) and len(tr_paths) + len(va_paths) == 48
        assert sorted(set(va_labels)) == [0, 1]
    fold_of = {p: f for f, (_, (paths, _)) in enumerate(folds) for p in paths}
    assert len({fold_of[f"t{i}"] for i in range(4)}) == 1 and fold_of["v0"] == fold_of["t10"]
    # without keys each image is its own group, still every image in one fold
    assert sorted(p for _, (paths, _) in kfold_rows(train, val, 4, 0)
                  for p in paths) == seen


def test_kfold_folds_stay_put_when_images_are_added():
    from components.data.split import kfold_rows

    def fold_of(rows):
        return {p: f for f, (_, (paths, _)) in enumerate(kfold_rows(rows, ([], []), 5, 3))
                for p in paths}

    before = fold_of(([f"a{i}" for i in range(200)], [i % 2 for i in range(200)]))
    after = fold_of(([f"a{i}" for i in range(300)], [i % 2 for i in range(300)]))
    assert all(after[p] == f for p, f in before.items())


def test_any_fsspec_protocol_through_the_storage_layer(image_folder):
    """A protocol pyarrow does not know (memory://) goes through fsspec; s3:// itself is
    tested against a real S3-compatible server (tests/integration/test_object_storage.py)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in image_folder.rglob("*"):
        if f.is_file():
            fs.pipe(f"/bucket/imgs/{f.relative_to(image_folder)}", f.read_bytes())
    index = index_image_folder("memory://bucket/imgs")
    local = index_image_folder(image_folder)
    assert index.classes == local.classes and len(index) == len(local)
    assert all(p.startswith("memory://") and "bucket/imgs/" in p for p in index.paths)
    v = validate_images(index)
    assert len(v.skipped) == 3 and len(v.index) == 40
    m = split_dataset(v, .15, .15, 0)
    assert m.fingerprint == split_dataset(validate_images(local), .15, .15, 0).fingerprint
    assert load_image(v.index.paths[0], 3, 8).shape == (8, 8, 3)


def test_rank_shards_cover_the_split_once_with_equal_lengths():
    from components.data.dataset import shard_indices

    for n, world in ((10, 2), (7, 2), (5, 3), (1, 2)):
        shards = [shard_indices(n, r, world, seed=3) for r in range(world)]
        assert len({len(s) for s in shards}) == 1          # every rank runs as many steps
        assert set().union(*shards) == set(range(n))       # every row is trained on
        assert sum(len(s) for s in shards) - n < world     # padding only to even out
        assert shards == [shard_indices(n, r, world, seed=3) for r in range(world)]
    assert shard_indices(10, 0, 2, 3) != shard_indices(10, 0, 2, 4)


def test_epoch_shuffle_is_a_seeded_permutation_per_epoch():
    from components.data.dataset import EpochShuffle

    s = EpochShuffle(20, seed=1)
    s.set_epoch(1)
    first = list(s)
    assert sorted(first) == list(range(20)) and first == list(s)
    s.set_epoch(2)
    assert list(s) != first and sorted(s) == list(range(20))


def test_cache_keeps_decoded_images_only_when_asked_and_when_they_fit(image_folder):
    from components.augment import build_eval_transform
    from components.data.dataset import ImageDataset, use_cache

    assert use_cache("auto", 1000, 3, 32, max_mb=256)            # 3 MiB
    assert not use_cache("auto", 20000, 3, 128, max_mb=256)      # 938 MiB
    assert use_cache("memory", 10**7, 3, 128, 0) and not use_cache("none", 1, 1, 1, 256)
    paths = [str(p) for p in sorted(image_folder.rglob("0*.png"))][:4]
    t = build_eval_transform(3, [0.5] * 3, [0.5] * 3)
    cached = ImageDataset(paths, [0] * 4, 3, 8, t, cache=True)
    streamed = ImageDataset(paths, [0] * 4, 3, 8, t, cache=False)
    assert cached.image(1) is cached.image(1)                   # decoded once
    assert streamed.image(1) is not streamed.image(1)           # decoded on every read
    assert (cached.image(1) == streamed.image(1)).all() and len(cached._cache) == 1


def test_a_separate_test_set_is_the_test_split_and_keeps_its_fingerprint(tmp_path):
    """data.test_path: its images are the test split whatever the training folder holds, so
    a later run over more training images is tested on the same images (same test
    fingerprint) while the data fingerprint changes."""
    import shutil

    from components.data.split import SplitManifest

    train = make_image_folder(tmp_path / "train", per_class=20, corrupt=False)
    test = make_image_folder(tmp_path / "test", per_class=8, seed=3, corrupt=False)
    held_out = validate_images(index_image_folder(test))
    m = split_dataset(validate_images(index_image_folder(train)), 0.2, 0.15, 0, held_out)
    assert m.counts()["test"] == 16 and m.counts()["train"] + m.counts()["val"] == 40
    assert set(m.subset("test")[0]) == set(held_out.index.paths)
    assert m.test_root == str(test.resolve())
    # more training images: another data fingerprint, the same test images
    more = make_image_folder(tmp_path / "more", per_class=30, seed=1, corrupt=False)
    m2 = split_dataset(validate_images(index_image_folder(more)), 0.2, 0.15, 0, held_out)
    assert m2.fingerprint != m.fingerprint and m2.test_fingerprint == m.test_fingerprint
    # the same test set mounted elsewhere is the same test set
    shutil.copytree(test, tmp_path / "elsewhere")
    moved = validate_images(index_image_folder(tmp_path / "elsewhere"))
    assert split_dataset(validate_images(index_image_folder(train)), 0.2, 0.15, 0,
                         moved).test_fingerprint == m.test_fingerprint
    # saved and loaded with the manifest
    m.save(tmp_path / "saved")
    loaded = SplitManifest.load(tmp_path / "saved")
    assert (loaded.test_fingerprint, loaded.test_root) == (m.test_fingerprint, m.test_root)
    assert loaded.subset("test") == m.subset("test")


def test_a_split_seed_moves_the_test_split_and_a_test_set_must_be_unseen(tmp_path):
    images = validate_images(index_image_folder(make_image_folder(
        tmp_path / "pets", per_class=20, corrupt=False)))
    a = split_dataset(images, 0.15, 0.15, 0)
    assert a.test_fingerprint == split_dataset(images, 0.15, 0.15, 0).test_fingerprint
    assert a.test_fingerprint != split_dataset(images, 0.15, 0.15, 1).test_fingerprint
    # a test set with a class the training data lacks, or with a training image in it
    birds = validate_images(index_image_folder(make_image_folder(
        tmp_path / "birds", classes=("cat", "bird"), per_class=4, corrupt=False)))
    with pytest.raises(DataError, match="classes the training data .* lacks: bird"):
        split_dataset(images, 0.15, 0.15, 0, birds)
    with pytest.raises(DataError, match="also in data.path .* must never be trained on"):
        split_dataset(images, 0.15, 0.15, 0, images)


def test_the_pipeline_data_step_uses_split_seed_and_test_path(tmp_path):
    from pipelines.compose import load_config
    from pipelines.steps import open_record, prepare_data

    train = make_image_folder(tmp_path / "train", per_class=20, corrupt=False)
    test = make_image_folder(tmp_path / "test", per_class=6, seed=3, corrupt=False)
    base = ["data=folder", f"data.path={train}", f"tracking.uri=sqlite:///{tmp_path}/m.db",
            f"tracking.artifact_location={tmp_path}/art"]

    def manifest(*extra):
        cfg = load_config([*base, *extra])
        with log_lines("pipelines.steps") as lines:
            record = open_record(cfg, None, None)
            return prepare_data(cfg, record).manifest, lines

    default, _ = manifest("seed=3")
    seeded, _ = manifest("seed=3", "data.split_seed=0")
    other_seed, _ = manifest("seed=4", "data.split_seed=0")  # another training seed
    assert seeded.test_fingerprint == other_seed.test_fingerprint != default.test_fingerprint
    held, lines = manifest(f"data.test_path={test}")
    assert held.counts()["test"] == 12 and held.test_root == str(test.resolve())
    assert any("test set: 12 image files" in line for line in lines)
    assert "  copies: 52 images in 52 groups: 0 exact copies, 0 near-copies (pHash <= 4 " \
           "bits), 0 label conflicts; each group kept in one split" in lines


def test_a_decompression_bomb_in_a_folder_is_a_skipped_counted_image(tmp_path):
    from tests.unit.test_serving_model import _png_header

    folder = make_image_folder(tmp_path / "pets", per_class=6, corrupt=False)
    (folder / "cat" / "bomb.png").write_bytes(_png_header(20_000, 20_000))
    v = validate_images(index_image_folder(folder), "skip", 3)
    (skipped,) = v.skipped
    assert skipped[0].endswith("bomb.png") and skipped[1].startswith("ImageRefused: ")
    assert len(v.index) == 12
