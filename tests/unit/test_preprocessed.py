"""The store of decoded images (components.data.preprocessed): built once by the validate
step, found again for the same files, rebuilt when one changes; trials' datasets read it
instead of decoding; in a bucket, each node reads its own copy."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from components.augment import build_eval_transform
from components.data.dataset import ImageDataset, load_image
from components.data.ingest import index_images
from components.data.preprocessed import (
    IMAGES,
    INDEX,
    LOCAL_COPIES_ENV,
    DecodedLookup,
    RowReader,
    open_store,
)
from components.data.validate import DecodeTarget, validate_images
from tests.conftest import make_image_folder


def _big_jpeg(path, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:600, 0:800]
    arr = np.stack([x / 4, y / 3, (x + y) / 6], -1) + rng.normal(0, 5, (600, 800, 3))
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)


@pytest.fixture
def folder(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=8)   # with 3 bad files
    _big_jpeg(root / "cat" / "photo.jpg")
    return root


def test_validate_decodes_once_into_a_store_that_holds_the_loaders_pixels(folder, tmp_path):
    index = index_images(str(folder))
    target = DecodeTarget(str(tmp_path / "runs"), 16, 3)
    first = validate_images(index, decode_to=target)
    store = first.decoded
    # every file once, but the empty one (refused as it is read)
    assert store is not None and store.decoded == len(index) - 1
    # the same readable images and reasons as the plain check (which decodes each file)
    plain = validate_images(index)
    assert first.index.paths == plain.index.paths and first.digests == plain.digests
    assert sorted(p for p, _ in first.skipped) == sorted(p for p, _ in plain.skipped)
    assert len(first.skipped) == 3   # the truncated PNG, the empty JPG, the text file
    lookup = DecodedLookup([store], 16, 3)
    for path in first.index.paths:
        np.testing.assert_array_equal(lookup.image(path), load_image(path, 3, 16))
    meta = json.loads((tmp_path / "runs" / "preprocessed" / store.key / INDEX).read_text())
    assert set(meta["bad"]) == {p for p, _ in first.skipped if "empty" not in p}
    rows = np.load(tmp_path / "runs" / "preprocessed" / store.key / IMAGES, mmap_mode="r")
    assert rows.shape == (len(store.paths), 16, 16, 3) and rows.dtype == np.uint8


def test_the_same_files_find_the_store_and_a_changed_one_builds_another(folder, tmp_path):
    target = DecodeTarget(str(tmp_path / "runs"), 16, 3)
    built = validate_images(index_images(str(folder)), decode_to=target)
    again = validate_images(index_images(str(folder)), decode_to=target)
    assert again.decoded.decoded == 0 and again.decoded.key == built.decoded.key
    assert again.skipped == built.skipped and again.digests == built.digests
    other_size = validate_images(index_images(str(folder)),
                                 decode_to=DecodeTarget(target.storage_path, 24, 3))
    assert other_size.decoded.key != built.decoded.key and other_size.decoded.decoded > 0
    _big_jpeg(folder / "cat" / "photo.jpg", seed=1)   # one image changed
    changed = validate_images(index_images(str(folder)), decode_to=target)
    assert changed.decoded.key != built.decoded.key
    assert changed.decoded.decoded == len(index_images(str(folder))) - 1
    lookup = DecodedLookup([changed.decoded], 16, 3)
    photo = str(folder / "cat" / "photo.jpg")
    np.testing.assert_array_equal(lookup.image(photo), load_image(photo, 3, 16))


def test_a_store_without_its_index_is_incomplete_and_rebuilt(folder, tmp_path):
    target = DecodeTarget(str(tmp_path / "runs"), 16, 3)
    built = validate_images(index_images(str(folder)), decode_to=target).decoded
    index_file = tmp_path / "runs" / "preprocessed" / built.key / INDEX
    index_file.unlink()   # what a build stopped before its last write leaves
    assert open_store(built.location) is None
    rebuilt = validate_images(index_images(str(folder)), decode_to=target).decoded
    assert rebuilt.decoded > 0 and index_file.is_file()


def test_a_dataset_reads_the_store_and_decodes_nothing(folder, tmp_path):
    v = validate_images(index_images(str(folder)), decode_to=DecodeTarget(
        str(tmp_path / "runs"), 16, 3))
    paths, labels = v.index.paths, v.index.labels
    transform = build_eval_transform(3, [0.5] * 3, [0.5] * 3)
    stored = ImageDataset(paths, labels, 3, 16, transform,
                          decoded=DecodedLookup([v.decoded], 16, 3))
    plain = ImageDataset(paths, labels, 3, 16, transform)
    for i in range(len(paths)):
        x, y, idx = stored[i]
        x2, y2, _ = plain[i]
        assert np.array_equal(x.numpy(), x2.numpy()) and int(y) == int(y2) and idx == i
    assert stored.decodes == 0 and plain.decodes == len(paths)
    # another size than the store's: the dataset decodes (a trial that searches the size)
    other = ImageDataset(paths, labels, 3, 24, transform,
                         decoded=DecodedLookup([v.decoded], 24, 3))
    other.image(0)
    assert other.decodes == 1


def test_reading_rows_holds_no_copy_of_the_data(folder, tmp_path):
    """A row is read by its offset: a reader keeps an open file, not the rows it read."""
    import pickle

    store = validate_images(index_images(str(folder)), decode_to=DecodeTarget(
        str(tmp_path / "runs"), 16, 3)).decoded
    reader = RowReader(store)
    rows = [reader[i] for i in range(len(store.paths))]
    assert all(r.flags.writeable and r.shape == (16, 16, 3) for r in rows)
    clone = pickle.loads(pickle.dumps(reader))   # as a DataLoader worker gets it
    np.testing.assert_array_equal(clone[3], rows[3])
    assert len(pickle.dumps(reader)) < 2 * len(pickle.dumps(store))


def test_a_store_in_a_bucket_is_built_once_and_each_node_reads_its_copy(s3_server, tmp_path,
                                                                         monkeypatch):
    folder = make_image_folder(tmp_path / "images", per_class=6, corrupt=False)
    bucket = s3_server.bucket("decoded")
    data = s3_server.upload_folder(folder, bucket, "images")
    target = DecodeTarget(f"s3://{bucket}/runs", 16, 3)
    index = index_images(data)
    store = validate_images(index, decode_to=target).decoded
    keys = s3_server.keys(bucket, "runs/preprocessed/")
    assert sorted(k.rsplit("/", 1)[-1] for k in keys) == sorted([INDEX, IMAGES])
    assert validate_images(index, decode_to=target).decoded.decoded == 0
    node = tmp_path / "node-a"
    monkeypatch.setenv(LOCAL_COPIES_ENV, str(node))
    lookup = DecodedLookup([open_store(store.location)], 16, 3)
    for path in index.paths:
        np.testing.assert_array_equal(lookup.image(path), load_image(path, 3, 16))
    copy = node / store.key / IMAGES
    assert copy.is_file()
    stamp = os.stat(copy).st_mtime_ns
    again = RowReader(store)   # a second rank on the node: the copy is there
    np.testing.assert_array_equal(again[0], lookup.image(store.paths[0]))
    assert os.stat(copy).st_mtime_ns == stamp


def test_a_row_cut_short_is_an_error_not_black_pixels(folder, tmp_path):
    store = validate_images(index_images(str(folder)), decode_to=DecodeTarget(
        str(tmp_path / "runs"), 16, 3)).decoded
    images = tmp_path / "runs" / "preprocessed" / store.key / IMAGES
    with open(images, "r+b") as f:
        f.truncate(images.stat().st_size - 100)
    with pytest.raises(OSError, match="cut short"):
        RowReader(store)[len(store.paths) - 1]


def test_a_jpeg_in_the_store_went_through_the_reduced_scale_decode(folder, tmp_path):
    store = validate_images(index_images(str(folder)), decode_to=DecodeTarget(
        str(tmp_path / "runs"), 16, 3)).decoded
    photo = str(folder / "cat" / "photo.jpg")
    full = Image.open(photo).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
    got = DecodedLookup([store], 16, 3).image(photo)
    assert np.abs(got.astype(int) - np.asarray(full)).mean() < 2.0
    with Image.open(io.BytesIO(open(photo, "rb").read())) as im:
        im.draft(im.mode, (32, 32))
        assert im.size == (100, 75)   # what libjpeg gave the resize
