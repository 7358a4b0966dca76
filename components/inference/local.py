"""Classifying images in this process, through the registered model's own `predict`
(`components.inference.formats.image_model`): there is one implementation of decoding,
preprocessing and classifying. Images are bytes, paths, object-storage URIs or PIL images;
the files are read here and the model is sent their bytes.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from PIL import Image

from components import imaging, storage
from components.data.ingest import image_files
from components.errors import MissingPathError
from components.inference.formats import class_names, image_model
from components.serving import image_classifier as _model_code

ERROR, PREDICTION, PROBABILITY = _model_code.ERROR, _model_code.PREDICTION, \
    _model_code.PROBABILITY
PATH = "path"       # the column `local_batches` puts in front: the image as it was named
BATCH_SIZE = 64

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


def classify_images(model, images: list, batch_size: int = 64) -> list[tuple[str, float]]:
    """Classify images that must all be read (`classify_files` skips the unreadable):
    `model`: an `mlflow.pyfunc` model logged by visiontune; `images`: bytes of image files,
    paths or PIL images. Returns (class, probability) per image; ValueError names the first
    image that could not be read."""
    frame = predict_images(model, list(images), batch_size)
    for i, err in enumerate(frame[ERROR]):
        if not _model_code.is_missing(err):
            what = images[i] if isinstance(images[i], (str, Path)) else type(images[i]).__name__
            raise ValueError(f"image {i} ({what}) could not be read: {err}")
    return [(str(p), float(q)) for p, q in zip(frame[PREDICTION], frame[PROBABILITY])]


def local_batches(model, paths: list[str], batch_size: int = BATCH_SIZE
                  ) -> Iterator[pd.DataFrame]:
    """In this process: the model's answer with a `path` column in front."""
    for i, frame in enumerate(predict_batches(model, paths, batch_size)):
        frame.insert(0, PATH, paths[i * batch_size: i * batch_size + len(frame)])
        yield frame
