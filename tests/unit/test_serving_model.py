"""The registered model: a pyfunc from code (components/serving/image_classifier.py) that takes
raw images and carries its own preprocessing. Its preprocessing against the training loader,
EXIF and colour modes, its output, the logged files, loading it where this repository cannot
be imported, and models registered by older visiontune versions (pytorch flavour, pt2)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components import imaging as pp
from components.augment import build_eval_transform
from components.data.dataset import load_image
from components.serving import MODEL_CODE, MODEL_FORMAT, PREPROCESSING_CODE
from components.serving import image_classifier as mc
from components.serving.packaging import log_image_classifier

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ["a", "b", "c d"]
PREP = {"image_size": 12, "channels": 3, "color_mode": "RGB", "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3], "layout": "NCHW float32"}


def _rng_image(mode: str, w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8), "RGB")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-5000, 300000, (h, w), np.int32))
    if mode == "F":
        return Image.fromarray(rng.normal(0, 10, (h, w)).astype(np.float32))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), np.uint8), "RGBA")
    if mode == "P":
        return rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return rgb.convert(mode)


# (mode, file format): every mode PIL reads that users' folders hold
FILES = [("RGB", "PNG"), ("RGB", "JPEG"), ("L", "PNG"), ("L", "JPEG"), ("RGBA", "PNG"),
         ("P", "PNG"), ("P", "GIF"), ("LA", "PNG"), ("1", "PNG"), ("CMYK", "JPEG"),
         ("I;16", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("RGB", "WEBP"), ("RGB", "BMP")]


def _file_bytes(mode: str, fmt: str, w: int = 23, h: int = 9, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    img = _rng_image(mode, w, h, seed)
    if mode == "P" and fmt == "PNG":
        img.info["transparency"] = 0
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("mode,fmt", FILES)
@pytest.mark.parametrize("channels", [1, 3])
def test_model_preprocessing_equals_the_training_loader(tmp_path, mode, fmt, channels):
    """The preprocessing the model logs decodes bytes to the training loader's pixels (from
    the same file on disk), bit for bit, and its normalisation gives the eval transform's
    (albumentations) values."""
    data = _file_bytes(mode, fmt)
    path = tmp_path / f"x.{fmt.lower()}"
    path.write_bytes(data)
    got = pp.to_array(pp.open_image(data, 12), channels, 12)
    np.testing.assert_array_equal(got, load_image(str(path), channels, 12))
    mean, std = PREP["mean"][:channels], PREP["std"][:channels]
    batch = pp.preprocess([data, str(path)], {**PREP, "channels": channels,
                                              "mean": mean, "std": std})
    expected = build_eval_transform(channels, mean, std)(image=got)["image"].numpy()
    assert batch.shape == (2, channels, 12, 12) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)
    np.testing.assert_array_equal(batch[0], batch[1])


def _photo_jpeg(w: int, h: int, seed: int = 0) -> bytes:
    """A smooth photo-like JPEG (gradients, a disc, mild noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = ((x - w / 2) ** 2 + (y - h / 2) ** 2 < (h / 3) ** 2) * 80.0
    arr = np.stack([x / w * 200 + disc, y / h * 200, (x + y) / (w + h) * 255 - disc], -1)
    arr = (arr + rng.normal(0, 6, arr.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.mark.parametrize("channels", [1, 3])
def test_a_large_jpeg_is_decoded_at_reduced_scale_everywhere_alike(tmp_path, channels):
    """A JPEG much larger than the target is decoded at a reduced scale (at least twice the
    target on both sides), close to a full decode + resize, and the training loader, the
    model's preprocessing and the served model's batch all give the same pixels."""
    data = _photo_jpeg(1600, 1200)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    with pp.open_image(data, 64) as img:
        assert img.size == (200, 150)            # 1/8: the smallest scale keeping >= 128 px
    with pp.open_image(data, 200) as img:
        assert img.size == (800, 600)
    with pp.open_image(data) as img:
        assert img.size == (1600, 1200)          # no target: a full decode
    reduced = pp.to_array(pp.open_image(data, 64), channels, 64)
    full = pp.to_array(pp.open_image(data), channels, 64)
    diff = np.abs(reduced.astype(int) - full)
    assert diff.mean() < 1.0 and diff.max() <= 8, (diff.mean(), diff.max())
    np.testing.assert_array_equal(load_image(str(path), channels, 64), reduced)
    batch = pp.preprocess([data], {**PREP, "channels": channels, "image_size": 64,
                                   "mean": PREP["mean"][:channels],
                                   "std": PREP["std"][:channels]})
    mean, std = PREP["mean"][:channels], PREP["std"][:channels]
    expected = build_eval_transform(channels, mean, std)(image=reduced)["image"].numpy()
    np.testing.assert_allclose(batch[0], expected, atol=1e-5)
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    with pp.open_image(png.getvalue(), 64) as img:
        assert img.size == (1600, 1200)          # only JPEG has a reduced-scale decode


def _exif_jpeg(orientation: int) -> tuple[bytes, np.ndarray]:
    """A 20x10 JPEG whose EXIF says `orientation`, and its pixels as stored (not rotated)."""
    arr = np.zeros((10, 20, 3), np.uint8)
    arr[:, :5] = (250, 0, 0)      # a red band on the left, as stored
    arr[:3, :] = (0, 0, 250)      # a blue band on top
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=100, exif=exif.tobytes())
    with Image.open(io.BytesIO(buf.getvalue())) as im:
        stored = np.asarray(im.convert("RGB"))
    return buf.getvalue(), stored


@pytest.mark.parametrize("orientation,rotate", [(1, lambda a: a), (3, lambda a: np.rot90(a, 2)),
                                                (6, lambda a: np.rot90(a, -1)),
                                                (8, lambda a: np.rot90(a, 1))])
def test_exif_orientation_is_applied(orientation, rotate):
    data, stored = _exif_jpeg(orientation)
    upright = Image.fromarray(np.ascontiguousarray(rotate(stored)))
    got = pp.to_array(pp.open_image(data), 3, 16)
    np.testing.assert_array_equal(got, pp.to_array(upright, 3, 16))
    if orientation != 1:
        assert not np.array_equal(got, pp.to_array(Image.fromarray(stored), 3, 16))


class _FixedNet:
    """Logits from the mean of each channel: a known answer without a trained network."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 4


def _classifier(classes=CLASSES) -> mc.ImageClassifier:
    m = mc.ImageClassifier()
    m.class_names, m.preprocessing, m._net = list(classes), dict(PREP), _FixedNet()
    m.prep = pp
    return m


def _png(color, size=(7, 5), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def test_output_frame_one_row_per_image_and_errors_per_row(tmp_path, monkeypatch):
    monkeypatch.setenv(mc.PATH_ROOTS_ENV, str(tmp_path))   # paths only under this folder
    red, blue = _png((255, 0, 0)), _png((0, 0, 255))
    (tmp_path / "blue.png").write_bytes(blue)
    big = _file_bytes("RGB", "PNG", w=64, h=64)
    frame = _classifier().predict(None, pd.DataFrame({
        "image": [red, b"not an image", None, big[:len(big) // 2], b""],
        "path": [None, None, str(tmp_path / "blue.png"), None, str(tmp_path / "nope.png")]}))
    assert list(frame.columns) == ["prediction", "probability", "prob_a", "prob_b", "prob_c d",
                                   "error"]
    assert frame.prediction.tolist()[:3] == ["a", None, "c d"]
    assert frame.error[0] is None and frame.error[2] is None
    assert frame.error[1] == "UnidentifiedImageError: cannot identify image file"
    assert frame.error[3].startswith("OSError") and "truncated" in frame.error[3]
    assert frame.error[4] == mc.PATH_REFUSED     # empty bytes: the path is used (missing)
    assert all(frame.loc[i, "probability"] is None for i in (1, 3, 4))  # JSON null, not NaN
    probs = frame.loc[[0, 2], ["prob_a", "prob_b", "prob_c d"]].to_numpy(float)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    np.testing.assert_allclose(frame.loc[[0, 2], "probability"].to_numpy(float),
                               probs.max(axis=1))

    ok = _classifier().predict(None, pd.DataFrame({"image": [red, blue]}))
    assert ok.prediction.tolist() == ["a", "c d"]
    assert ok.probability.dtype == np.float64 and ok.error.isna().all()
    json.dumps(frame.to_dict(orient="records"), default=str, allow_nan=False)


def test_input_without_image_or_path_is_refused():
    with pytest.raises(ValueError, match="column 'image'"):
        _classifier().predict(None, pd.DataFrame({"x": [1]}))
    empty = _classifier().predict(None, pd.DataFrame({"image": []}))
    assert len(empty) == 0 and "prob_a" in empty.columns
    row = _classifier().predict(None, pd.DataFrame({"image": [None]}))
    assert row.error[0].startswith("no image")


@pytest.mark.timed
def test_paths_are_read_only_under_an_allowed_root_and_refused_alike(tmp_path, monkeypatch):
    """A client names a server file: missing, outside, a symlink out, a FIFO, a device, a
    folder all get one answer, at once; a regular file under the allowed root is read."""
    import os
    import time

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "blue.png").write_bytes(_png((0, 0, 255)))
    (tmp_path / "secret.png").write_bytes(_png((255, 0, 0)))
    (allowed / "out.png").symlink_to(tmp_path / "secret.png")
    (allowed / "inside.png").symlink_to(allowed / "blue.png")   # a link within the root
    (allowed / "sub").symlink_to(tmp_path)                       # a folder link out of it
    os.mkfifo(allowed / "fifo.png")
    hostile = ["/etc/passwd", str(tmp_path / "secret.png"), str(allowed / "out.png"),
               str(allowed / "fifo.png"), "/dev/zero", str(allowed), str(allowed / "nope.png"),
               str(allowed / ".." / "secret.png"), str(allowed / "sub" / "secret.png")]
    paths = [str(allowed / "blue.png"), str(allowed / "inside.png"), *hostile]
    off = _classifier().predict(None, pd.DataFrame({"path": paths}))
    assert (off.error == mc.PATHS_OFF).all()            # no root named: no path is read
    monkeypatch.setenv(mc.PATH_ROOTS_ENV, str(allowed))
    start = time.monotonic()
    frame = _classifier().predict(None, pd.DataFrame({"path": paths}))
    assert time.monotonic() - start < 2
    assert frame.prediction[:2].tolist() == ["c d", "c d"] and frame.error[:2].isna().all()
    assert frame.error[2:].tolist() == [mc.PATH_REFUSED] * len(hostile)
    assert "passwd" not in mc.PATH_REFUSED and "exist" not in mc.PATH_REFUSED


def _png_header(width: int, height: int, bit_depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose header declares width x height and whose pixel data is a few KB of
    zlib-compressed zeros (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\0" * (1 + width * (3 if color == 2 else 1) * bit_depth // 8)
    body = zlib.compressobj(9)
    packed = b"".join(body.compress(row) for _ in range(min(height, 64))) + body.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bit_depth, color, 0, 0, 0))
            + chunk(b"IDAT", packed) + chunk(b"IEND", b""))


_MEMORY_PROBE = """
import json, resource
import pandas as pd
from tests.unit.test_serving_model import _classifier, _png, _png_header

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

model = _classifier()
model.predict(None, pd.DataFrame({"image": [_png((0, 0, 255))]}))   # warm
grown, base = {}, peak_mb()
frame = model.predict(None, pd.DataFrame({"image": [
    _png_header(20_000, 20_000), _png_header(12_000, 12_000, bit_depth=16, color=0)]}))
assert frame.error.notna().all()
grown["bombs"], base = peak_mb() - base, peak_mb()
frame = model.predict(None, pd.DataFrame({"image": [
    _png_header(7_000, 7_000, bit_depth=16, color=0)]}))   # 49 M pixels: decoded and scaled
assert frame.error.isna().all(), frame.error[0]
grown["deep_within_limit"] = peak_mb() - base
print(json.dumps(grown))
"""


@pytest.mark.timed
def test_decoding_is_bounded_per_image(monkeypatch):
    import time

    bomb = _png_header(20_000, 20_000)
    deep = _png_header(12_000, 12_000, bit_depth=16, color=0)
    assert len(bomb) < 100_000 and len(deep) < 100_000
    # Peak memory in a fresh process (this one's peak may be higher from earlier tests): the
    # bombs refused on their header cost nothing; a real 16-bit image just under the limit
    # scaled in float32 by row blocks, not in float64 (that cost gigabytes).
    probe = subprocess.run([sys.executable, "-c", _MEMORY_PROBE], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    grown = json.loads(probe.stdout.strip().splitlines()[-1])
    assert grown["bombs"] < 50, grown
    # 281 MB measured: the 16-bit pixels (98 MB), their 8-bit copy and its RGB conversion; a
    # float64 copy of the image alone would add 392 MB
    assert grown["deep_within_limit"] < 380, grown
    ppm = io.BytesIO()
    Image.new("RGB", (4, 4)).save(ppm, format="PPM")   # a format Pillow knows, not allowed
    frames = io.BytesIO()
    Image.new("RGB", (6, 6), (255, 0, 0)).save(frames, format="GIF", save_all=True,
                                               append_images=[Image.new("RGB", (6, 6),
                                                                        (0, 0, 255))])
    start = time.monotonic()
    frame = _classifier().predict(None, pd.DataFrame({"image": [
        bomb, deep, ppm.getvalue(), frames.getvalue(), _png((0, 0, 255))]}))
    assert time.monotonic() - start < 2
    assert frame.error[0] == ("ImageRefused: 400,000,000 pixels is more than the limit of "
                              "50,000,000 (VISIONTUNE_MAX_IMAGE_PIXELS)")
    assert frame.error[1].startswith("ImageRefused: 12000 x 12000 pixels")
    assert frame.error[2].startswith("UnidentifiedImageError")
    assert frame.prediction[3:].tolist() == ["a", "c d"]    # a GIF's first frame: red
    # the limits are the operator's to change, and the training ingest applies them too
    monkeypatch.setenv(pp.MAX_PIXELS_ENV, "20")
    small = _classifier().predict(None, pd.DataFrame({"image": [_png((0, 0, 255))]}))
    assert small.error[0].startswith("ImageRefused: 7 x 5 pixels")
    monkeypatch.setenv(pp.MAX_PIXELS_ENV, "1e9")
    monkeypatch.setenv(pp.MAX_BYTES_ENV, "100")
    assert _classifier().predict(None, pd.DataFrame({"image": [bomb]})).error[0].startswith(
        "ImageRefused: ")
    monkeypatch.setenv(mc.MAX_ROWS_ENV, "2")
    with pytest.raises(ValueError, match="3 images in one request; at most 2"):
        _classifier().predict(None, pd.DataFrame({"image": [_png((0, 0, 0))] * 3}))


def test_a_request_spends_a_pixel_budget_and_the_next_one_has_its_own(monkeypatch):
    """Many images just under the per-image limit cannot hold a scoring worker for minutes:
    the rows after the request's budget is spent are refused, before they are decoded."""
    monkeypatch.setenv(pp.MAX_REQUEST_PIXELS_ENV, "80")    # two 7 x 5 images, not three
    images = pd.DataFrame({"image": [_png((0, 0, 255))] * 3})
    for _ in range(2):
        frame = _classifier().predict(None, images)
        assert frame.error[:2].tolist() == [None, None]
        assert frame.prediction[:2].tolist() == ["c d", "c d"]
        assert frame.error[2] == ("ImageRefused: 7 x 5 pixels is more than this request has "
                                  "left of its 80 (VISIONTUNE_MAX_REQUEST_PIXELS): send fewer "
                                  "images per request")
    monkeypatch.setenv(pp.MAX_REQUEST_PIXELS_ENV, "1000")
    assert _classifier().predict(None, images).error.isna().all()


def test_a_16_bit_image_within_the_limit_scales_in_float32():
    arr = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20)
    img = Image.fromarray(arr)   # mode I;16
    assert img.mode == "I;16"
    got = pp.to_array(img, 1, 8)
    ref = ((arr - arr.min()) * (255.0 / (arr.max() - arr.min()))).astype(np.uint8)
    expected = np.asarray(Image.fromarray(ref).resize((8, 8), pp.RESAMPLE))[:, :, None]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_more_images_than_one_batch_keep_their_order():
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [_png(colors[i % 3], size=(3 + i % 5, 4)) for i in range(mc.BATCH_SIZE * 2 + 3)]
    frame = _classifier().predict(None, pd.DataFrame({"image": images}))
    assert frame.prediction.tolist() == [["a", "b", "c d"][i % 3] for i in range(len(images))]


def test_model_file_imports_only_what_a_serving_environment_has():
    import ast

    tree = ast.parse(MODEL_CODE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "hashlib", "importlib", "io", "os", "re", "stat",
                        "mlflow", "numpy", "pandas", "PIL", "torch"}
    tree = ast.parse(PREPROCESSING_CODE.read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "io", "os", "re", "warnings", "numpy", "PIL"}


# ----------------------------------------------------------------- a logged, registered model

MODEL = "serving-unit"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A small CNN logged by `log_image_classifier` and registered as champion."""
    import mlflow

    from components.config import CnnConfig, ModelConfig
    from components.models import build_model
    from components.registry import register_challenger
    from components.tracking import Tracker

    tmp = tmp_path_factory.mktemp("serving")
    torch.manual_seed(0)
    net = build_model(ModelConfig(cnn=CnnConfig(channels=[4, 8])), len(CLASSES), 3).eval()
    tracker = Tracker(f"sqlite:///{tmp}/mlflow.db")
    exp = tracker.ensure_experiment("serving", str(tmp / "mlruns"))
    run = tracker.create_run(exp, "pipeline", {})
    meta = {"class_names": CLASSES, "preprocessing": PREP, "data_fingerprint": "f" * 64,
            "pipeline_id": "vt-test", "hyperparameters": {"train.lr": "0.1"}}
    uri = log_image_classifier(tracker, run, net, CLASSES, PREP, meta)
    version = register_challenger(tracker, uri, MODEL, run, {"test_f1": 0.5})
    assert version.aliases == ("challenger", "champion")
    with pytest.MonkeyPatch.context() as env:
        mlflow.set_tracking_uri(tracker.uri)
        env.setenv("MLFLOW_TRACKING_URI", tracker.uri)
        yield {"tracker": tracker, "net": net, "uri": uri, "tmp": tmp, "run": run,
               "model": mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")}


def _images(tmp: Path) -> tuple[list[bytes], list[str]]:
    data = [_file_bytes(m, f, w=9 + 3 * i, h=30 - i, seed=i) for i, (m, f) in enumerate(FILES)]
    paths = []
    for i, ((_, fmt), d) in enumerate(zip(FILES, data)):
        p = tmp / f"img{i}.{fmt.lower()}"
        p.write_bytes(d)
        paths.append(str(p))
    return data, paths


def test_logged_model_files_signature_and_metadata(registered):
    from mlflow.models import Model
    from mlflow.types import DataType

    model = registered["model"]
    info = Model.load(f"models:/{MODEL}@champion")
    assert set(info.flavors) == {"python_function"}
    pyfunc = info.flavors["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == MODEL_CODE.name
    assert pyfunc["artifacts"]["weights"]["path"].endswith(".pt2")
    assert pyfunc["config"] == {"class_names": CLASSES, "preprocessing": PREP}
    meta = model.metadata.metadata
    assert meta["model_format"] == MODEL_FORMAT and meta["class_names"] == CLASSES
    assert meta["preprocessing"] == PREP and meta["data_fingerprint"] == "f" * 64
    assert meta["hyperparameters"] == {"train.lr": "0.1"} and meta["pipeline_id"] == "vt-test"
    inputs = {c.name: (c.type, c.required) for c in info.signature.inputs.inputs}
    assert inputs == {"image": (DataType.binary, False), "path": (DataType.string, False)}
    assert info.signature.outputs.input_names() == mc.output_columns(CLASSES)
    assert info.saved_input_example_info["type"] == "dataframe"
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion",
                                                     dst_path=str(registered["tmp"] / "m")))
    example = Model.load(str(local)).load_input_example(str(local))
    assert list(example.columns) == ["image"]
    assert Image.open(io.BytesIO(example.image[0])).size == (12, 12)
    req = (local / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in req} >= {"mlflow", "torch", "numpy", "pandas", "pillow"}
    assert all("==" in r and "+" not in r for r in req)
    assert (local / MODEL_CODE.name).read_text() == MODEL_CODE.read_text()
    logged = local / pyfunc["artifacts"]["preprocessing"]["path"]
    assert logged.read_text() == PREPROCESSING_CODE.read_text()
    serving = json.loads((local / "serving_input_example.json").read_text())
    assert serving["dataframe_split"]["columns"] == ["image"]


def test_logged_model_equals_the_network_on_any_image(registered, tmp_path):
    """The exported program and the model file's preprocessing give the trained network's
    probabilities, for bytes and paths, batches of 1 and many."""
    from components.inference.local import classify_images, predict_images

    model, net = registered["model"], registered["net"]
    data, paths = _images(tmp_path)
    with torch.no_grad():
        expected = net(torch.from_numpy(pp.preprocess(data, PREP))).softmax(1).numpy()
    frame = model.predict(pd.DataFrame({"image": data}))
    assert frame.error.isna().all()
    np.testing.assert_allclose(frame[[f"prob_{c}" for c in CLASSES]].to_numpy(float), expected,
                               atol=1e-5)
    assert frame.prediction.tolist() == [CLASSES[k] for k in expected.argmax(1)]
    refused = model.predict(pd.DataFrame({"path": paths}))   # by default: bytes only
    assert (refused.error == mc.PATHS_OFF).all() and refused.prediction.isna().all()
    with pytest.MonkeyPatch.context() as env:
        env.setenv(mc.PATH_ROOTS_ENV, str(tmp_path))
        by_path = model.predict(pd.DataFrame({"path": paths}))
    pd.testing.assert_frame_equal(by_path, frame)
    one = model.predict(pd.DataFrame({"image": data[:1]}))
    np.testing.assert_allclose(one.probability.to_numpy(float), frame.probability[:1], atol=1e-6)
    pil = [Image.open(p) for p in paths]
    assert classify_images(model, pil) == classify_images(model, data) \
        == classify_images(model, paths)
    both = predict_images(model, [data[0], paths[1], pil[2]], batch_size=2)
    pd.testing.assert_frame_equal(both, frame.iloc[:3].reset_index(drop=True))


def test_pil_images_keep_their_exif_orientation(registered):
    from components.inference.local import classify_images, encode_image

    data, _ = _exif_jpeg(6)
    with Image.open(io.BytesIO(data)) as im:
        assert classify_images(registered["model"], [im]) == \
            classify_images(registered["model"], [data])
        assert Image.open(io.BytesIO(encode_image(im))).getexif()[0x0112] == 6


def test_classify_files_skips_what_does_not_decode(registered, tmp_path):
    from components.inference.local import classify_files, classify_images

    good = tmp_path / "good.png"
    good.write_bytes(_png((255, 0, 0)))
    (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:40])
    (tmp_path / "empty.jpg").write_bytes(b"")
    paths = [str(good), str(tmp_path / "truncated.png"), str(tmp_path / "empty.jpg")]
    rows, skipped = classify_files(registered["model"], paths)
    assert [r[0] for r in rows] == [str(good)] and rows[0][1] in CLASSES
    assert [s[0] for s in skipped] == paths[1:]
    assert all(": " in reason for _, reason in skipped)
    with pytest.raises(ValueError, match=r"image 1 \(.*truncated.png\) could not be read"):
        classify_images(registered["model"], paths)


def test_registered_model_loads_where_this_repository_cannot_be_imported(registered, tmp_path):
    """A fresh interpreter, isolated (-I: no PYTHONPATH, no script or working directory on
    sys.path), in another directory, with the editable install's finder taken out: only the
    site-packages remain. It loads models:/NAME@champion and classifies raw bytes."""
    data, _ = _images(tmp_path)
    (tmp_path / "images.json").write_text(json.dumps([d.hex() for d in data]))
    out = subprocess.run(
        [sys.executable, "-I", "-c", ISOLATED_SCRIPT, registered["tracker"].uri,
         f"models:/{MODEL}@champion", str(tmp_path / "images.json"), str(ROOT)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer["repo_importable"] is False
    assert answer["repo_modules"] == []
    assert answer["model_file"].startswith(str(registered["tmp"])) or \
        not answer["model_file"].startswith(str(ROOT))
    expected = registered["model"].predict(pd.DataFrame({"image": data}))
    assert answer["prediction"] == expected.prediction.tolist()
    np.testing.assert_allclose(answer["probability"], expected.probability.to_numpy(float),
                               atol=1e-6)


ISOLATED_SCRIPT = r"""
import json, sys
# The project's editable install maps `components`/`pipelines` to the checkout from any
# directory; a serving host has no such thing.
sys.meta_path[:] = [f for f in sys.meta_path
                    if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_importer_cache.clear()
uri, model_uri, images, root = sys.argv[1:5]
try:
    import components  # noqa: F401
    importable = True
except ModuleNotFoundError:
    importable = False
import mlflow
import pandas as pd
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model(model_uri)
data = [bytes.fromhex(h) for h in json.load(open(images))]
frame = model.predict(pd.DataFrame({"image": data}))
repo = [name for name, m in list(sys.modules.items())
        if (getattr(m, "__file__", None) or "").startswith(root + "/")
        and "/.venv/" not in (m.__file__ or "")]
code = [m.__file__ for name, m in sys.modules.items() if name.startswith("code_model_")]
print(json.dumps({"repo_importable": importable, "repo_modules": repo,
                  "model_file": code[0] if code else "",
                  "prediction": frame.prediction.tolist(),
                  "probability": frame.probability.astype(float).tolist()}))
"""


# ----------------------------------------------------------------- models of older versions

def test_models_of_older_versions_still_classify_the_same_way(registered, tmp_path):
    """A version registered before models-from-code (mlflow.pytorch, pt2, tensors in) is
    classified by the same decoding and preprocessing, with its own forward pass."""
    import mlflow

    from components.inference.local import classify_files, classify_images, predict_images
    from components.registry import register_challenger

    tracker, net = registered["tracker"], registered["net"]
    run = tracker.create_run(tracker.ensure_experiment("serving"), "old pipeline", {})
    with mlflow.start_run(run_id=run):
        info = mlflow.pytorch.log_model(
            net, name="model", input_example=torch.zeros(2, 3, 12, 12).numpy(),
            metadata={"class_names": CLASSES, "preprocessing": PREP})
    register_challenger(tracker, info.model_uri, MODEL, run, {"test_f1": 0.4})
    legacy = mlflow.pyfunc.load_model(f"models:/{MODEL}@challenger")
    assert "pytorch" in legacy.metadata.flavors
    data, paths = _images(tmp_path)
    new = predict_images(registered["model"], data)
    old = predict_images(legacy, data)
    pd.testing.assert_frame_equal(old, new, atol=1e-5)
    old_answer = classify_images(legacy, paths)
    new_answer = classify_images(registered["model"], paths)
    assert [c for c, _ in old_answer] == [c for c, _ in new_answer]
    assert [p for _, p in old_answer] == pytest.approx([p for _, p in new_answer], abs=1e-5)
    rows, skipped = classify_files(legacy, [paths[0], str(tmp_path / "missing.png")])
    assert len(rows) == 1 and skipped[0][1].startswith("FileNotFoundError")


def test_a_model_visiontune_did_not_log_is_refused_in_one_line(registered, tmp_path, capsys):
    import mlflow

    from components.inference.local import classify_images
    from pipelines.cli import main

    tracker = registered["tracker"]
    run = tracker.create_run(tracker.ensure_experiment("serving"), "other", {})
    with mlflow.start_run(run_id=run):
        info = mlflow.pytorch.log_model(torch.nn.Linear(3, 2), name="model",
                                        input_example=torch.zeros(2, 3).numpy())
    tracker.client.update_run(run, "FINISHED")
    other = mlflow.pyfunc.load_model(info.model_uri)
    with pytest.raises(ValueError, match="not a visiontune image classifier"):
        classify_images(other, [_png((1, 2, 3))])
    img = tmp_path / "x.png"
    img.write_bytes(_png((1, 2, 3)))
    code = main(["predict", "--model", info.model_uri, str(img),
                 "--tracking-uri", tracker.uri])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"visiontune: error: cannot classify with {info.model_uri}: ")
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", f"models:/{MODEL}@champion", str(img), "-o", str(out),
                 "--tracking-uri", tracker.uri]) == 0
    rows = pd.read_csv(out)
    assert list(rows.columns) == ["path", "prediction", "probability"]
    assert rows.prediction[0] in CLASSES



def test_loading_the_model_leaves_autograd_on(registered):
    """A process that loads the champion may train afterwards: loading and predicting must not
    switch autograd off for the whole process (it once did, and every later training test in
    the same pytest process failed)."""
    import mlflow

    torch.set_grad_enabled(True)
    model = mlflow.pyfunc.load_model(registered["uri"])
    model.predict(pd.DataFrame({"image": [_png((200, 10, 10))]}))
    assert torch.is_grad_enabled()
    w = torch.ones(2, requires_grad=True)
    (w * 3).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 3.0))


def test_each_model_runs_the_preprocessing_logged_with_it(registered, tmp_path, monkeypatch):
    """The model loads its own logged copy of the preprocessing under a name of its own: a
    second model in the same process, logged with different code, does not change the first
    one's answers (an `import preprocessing` from the model's code path would share one)."""
    import mlflow

    import components.serving

    changed = tmp_path / "preprocessing.py"
    changed.write_text(PREPROCESSING_CODE.read_text() + (
        "\n\ndef softmax(logits):\n    return np.full(logits.shape, 1.0 / logits.shape[1])\n"))
    monkeypatch.setattr(components.serving, "PREPROCESSING_CODE", changed)
    tracker = registered["tracker"]
    run = tracker.create_run(tracker.ensure_experiment("serving"), "other", {})
    other_uri = log_image_classifier(tracker, run, registered["net"], CLASSES, PREP,
                                             {"class_names": CLASSES, "preprocessing": PREP})
    image = pd.DataFrame({"image": [_png((200, 10, 10)), _png((10, 10, 200))]})
    first = mlflow.pyfunc.load_model(registered["uri"])
    before = first.predict(image)
    other = mlflow.pyfunc.load_model(other_uri).predict(image)
    np.testing.assert_allclose(other[[f"prob_{c}" for c in CLASSES]].to_numpy(float), 1 / 3)
    after = first.predict(image)
    pd.testing.assert_frame_equal(before, after)
    assert not np.allclose(before.probability.to_numpy(float), 1 / 3)
