"""Classify images with a registered visiontune model, the same way wherever it runs.

A model logged by visiontune is an MLflow pyfunc from code (`components/serving/
image_classifier.py`): it takes image bytes or paths, decodes and preprocesses them itself and
returns one row per image (`prediction`, `probability`, `prob_<class>`..., `error`). Everything
here goes through that model's `predict`, as `mlflow models serve` does: there is one
implementation of decoding, preprocessing and classifying.

Models registered by visiontune before that (MLflow's `pytorch` flavour, pt2 format, taking a
preprocessed float32 NCHW tensor and returning logits) are still classified: the same code
decodes and preprocesses with the preprocessing recorded in their metadata, only the forward
pass is theirs. Anything else is refused with one line (`ValueError`).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components import imaging, storage
from components.data.ingest import image_files
from components.errors import MissingPathError
from components.imaging import preprocess, softmax  # noqa: F401 (API)
from components.serving import MODEL_FORMAT
from components.serving import image_classifier as _model_code

ERROR, PREDICTION, PROBABILITY = _model_code.ERROR, _model_code.PREDICTION, \
    _model_code.PROBABILITY

# Modes PNG stores losslessly; anything else (CMYK, 32-bit int, float, ...) goes as TIFF.
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; folders walked recursively for image files (hidden ones skipped), in
    name order. A path may be an object-storage URI (`s3://bucket/folder`, read through
    `components.storage` with the same credentials as the pipeline's data)."""
    out = []
    for p in map(str, paths):
        kind = storage.file_type(p) if storage.is_uri(p) else \
            ("dir" if Path(p).is_dir() else "file" if Path(p).is_file() else "missing")
        if kind == "dir":
            out += [f for f, _ in image_files(p)]
        elif kind == "file":
            out.append(p)
        else:
            raise MissingPathError(f"{p} does not exist" + (" (or is not readable)"
                                                            if storage.is_uri(p) else ""))
    return out


class _TensorModel(_model_code.ImageClassifier):
    """A model registered before models-from-code (pytorch flavour, pt2): it takes the
    preprocessed tensor and returns logits. Decoding and preprocessing are the model file's."""

    def __init__(self, pyfunc, meta: dict):
        self._pyfunc = pyfunc
        self.class_names = [str(c) for c in meta["class_names"]]
        self.preprocessing = dict(meta["preprocessing"])
        self.prep = imaging   # this repository's: the model file has none of its own

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(self._pyfunc.predict(batch), dtype=np.float64))

    def predict(self, model_input: pd.DataFrame) -> pd.DataFrame:
        return self.classify(_model_code.image_sources(model_input))


def check_model_format(metadata: dict, flavors: dict) -> str:
    """'images' for a model of this format, 'tensor' for one of an older visiontune (pytorch
    flavour, pt2); anything else: ValueError in one line."""
    fmt = metadata.get("model_format")
    if fmt == MODEL_FORMAT:
        return "images"
    if fmt is not None:
        raise ValueError(f"this model's format {fmt!r} is not one this visiontune knows "
                         f"({MODEL_FORMAT}); was it logged by a newer visiontune?")
    if "pytorch" in (flavors or {}) and {"class_names", "preprocessing"} <= metadata.keys():
        return "tensor"
    raise ValueError("this model is not a visiontune image classifier: its metadata has no "
                     "model_format, and no class_names/preprocessing of an older visiontune model")


def image_model(model):
    """`model` (from `mlflow.pyfunc.load_model`) as something whose `predict` takes a
    DataFrame of `image` bytes / `path`s and returns the model file's output frame."""
    if isinstance(model, _model_code.ImageClassifier):
        return model   # already one (a model of an older version, wrapped)
    meta = model.metadata.metadata or {}
    if check_model_format(meta, model.metadata.flavors) == "images":
        return model
    return _TensorModel(model, meta)


def class_names(model) -> list[str]:
    """The model's classes, in its output order."""
    m = image_model(model)
    if isinstance(m, _model_code.ImageClassifier):
        return list(m.class_names)
    return [str(c) for c in m.metadata.metadata["class_names"]]


def encode_image(img: Image.Image) -> bytes:
    """A PIL image as the bytes of a lossless file (PNG, or TIFF for modes PNG cannot hold),
    EXIF kept: the model decodes it to exactly this image and applies its EXIF orientation."""
    exif = img.getexif()
    for fmt in (("PNG",) if img.mode in _PNG_MODES else ()) + ("TIFF",):
        buf = io.BytesIO()
        try:
            img.save(buf, format=fmt, exif=exif)
            return buf.getvalue()
        except (OSError, KeyError, ValueError):
            continue
    raise ValueError(f"cannot pass a PIL image of mode {img.mode} to the model; convert it to "
                     f"RGB or L first")


def _read(path: str) -> bytes:
    """A local file or an object-storage URI, read here: the model reads only bytes. A file
    over the model's byte limit is refused before it is read into memory."""
    if not storage.is_uri(path):
        with open(path, "rb") as f:
            data = f.read(imaging.max_image_bytes() + 1)
        return data
    return storage.read_bytes(path)


def _input_frame(images: list) -> tuple[pd.DataFrame, dict[int, str]]:
    """bytes, paths, object-storage URIs and PIL images -> the model's input (column
    `image`: the bytes of each file, read here), and {row: why} for files that could not be
    read."""
    data, unread = [], {}
    for i, im in enumerate(images):
        if isinstance(im, (str, Path)):
            try:
                data.append(_read(str(im)))
            except (OSError, ValueError) as e:   # ValueError: a limit set to no number
                data.append(None)
                unread[i] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        else:
            data.append(encode_image(im) if isinstance(im, Image.Image) else bytes(im))
    return pd.DataFrame({"image": pd.Series(data, dtype=object)}), unread


def predict_batches(model, images: list, batch_size: int = 64) -> Iterator[pd.DataFrame]:
    """The model's answer for `images` (bytes, paths, URIs or PIL images), `batch_size` at a
    time and in order: `prediction`, `probability`, `prob_<class>` per class, `error` (null
    when the image was read)."""
    m = image_model(model)
    for i in range(0, len(images), batch_size):
        frame, unread = _input_frame(images[i:i + batch_size])
        out = m.predict(frame)
        for row, why in unread.items():
            out.at[row, ERROR] = why
        yield out


def predict_images(model, images: list, batch_size: int = 64) -> pd.DataFrame:
    """The model's whole answer, one row per image (see `predict_batches`)."""
    frames = list(predict_batches(model, images, batch_size))
    if not frames:
        return pd.DataFrame(columns=_model_code.output_columns(class_names(model)))
    return pd.concat(frames, ignore_index=True)


def classify_files(model, paths: list[str], batch_size: int = 64
                   ) -> tuple[list[tuple[str, str, float]], list[tuple[str, str]]]:
    """Classify image files; a file that does not decode is skipped, not fatal. Returns
    ([(path, class, probability)], [(path, reason skipped)])."""
    rows, skipped = [], []
    frame = predict_images(model, list(paths), batch_size)
    for path, pred, prob, err in zip(paths, frame[PREDICTION], frame[PROBABILITY],
                                     frame[ERROR]):
        if _model_code.is_missing(err):
            rows.append((path, str(pred), float(prob)))
        else:
            skipped.append((path, str(err)))
    return rows, skipped


def classify(model, images: list, batch_size: int = 64) -> list[tuple[str, float]]:
    """`model`: an `mlflow.pyfunc` model logged by visiontune; `images`: bytes of image files,
    paths or PIL images. Returns (class, probability) per image; ValueError names the first
    image that could not be read."""
    frame = predict_images(model, list(images), batch_size)
    for i, err in enumerate(frame[ERROR]):
        if not _model_code.is_missing(err):
            what = images[i] if isinstance(images[i], (str, Path)) else type(images[i]).__name__
            raise ValueError(f"image {i} ({what}) could not be read: {err}")
    return [(str(p), float(q)) for p, q in zip(frame[PREDICTION], frame[PROBABILITY])]
