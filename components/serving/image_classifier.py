"""visiontune's registered model: raw images in, classes out (MLflow models-from-code).

MLflow copies this file into every model visiontune logs and runs it when the model is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`, `mlflow models build-docker`), in a process
that may know nothing of visiontune. So it imports only torch, numpy, PIL, pandas and mlflow,
and it carries the whole eval-time preprocessing.

Input: a DataFrame, one row per image, with a column `image` (the bytes of an image file:
PNG, JPEG, anything PIL reads; over HTTP, base64 in JSON, which MLflow's scoring server decodes
for a `binary` column) and/or a column `path` (a file the model's process can read), used for
rows whose `image` is empty.

Output: a DataFrame, one row per input row, in order:
  prediction     the class name with the highest probability
  probability    its probability
  prob_<class>   the probability of each class, in the model's class order
  error          null, or why this row's image could not be read (then the others are null):
                 one bad image does not fail the batch.

Preprocessing (the training pipeline's eval transform, `model_config["preprocessing"]`): EXIF
orientation applied; 16-bit and float greyscale scaled into 8 bits; converted to L (1 channel)
or RGB (3; an alpha channel is dropped, palettes expanded); bilinear resize to image_size x
image_size (aspect ratio not kept); pixel / 255; (x - mean) / std; NCHW float32. The network is
a torch.export program (artifact `weights`) that returns logits; softmax gives probabilities.
"""

from __future__ import annotations

import io
import os
import re

import mlflow
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

WEIGHTS = "weights"           # artifact key of the torch.export program (.pt2)
IMAGE, PATH = "image", "path"  # input columns
PREDICTION, PROBABILITY, ERROR = "prediction", "probability", "error"
PROB_PREFIX = "prob_"
BATCH_SIZE = 64               # images decoded and run at once: bounds memory per request
RESAMPLE = Image.Resampling.BILINEAR
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I", "F")
_BYTES_REPR = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # PIL's name for bytes


def output_columns(class_names: list[str]) -> list[str]:
    return [PREDICTION, PROBABILITY, *(PROB_PREFIX + c for c in class_names), ERROR]


def open_image(source) -> Image.Image:
    """Bytes of an image file, a path, or a PIL image -> a decoded PIL image."""
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(source)))
    elif isinstance(source, (str, os.PathLike)):
        img = Image.open(source)
    else:
        raise TypeError(f"expected image bytes or a path, got {type(source).__name__}")
    img.load()  # decode now: a truncated file fails here, for this row only
    return img


def to_array(img: Image.Image, channels: int, image_size: int) -> np.ndarray:
    """Any size or colour mode -> uint8 (size, size, channels). The same steps as the training
    pipeline's image loader (components.data.dataset.load_image; a test keeps them equal)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _HIGH_BIT_MODES:
        # 16-bit/float greyscale: scale into 8 bits instead of letting convert() clip.
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        img = Image.fromarray(((arr - arr.min()) * (255.0 / span)).astype(np.uint8))
    img = img.convert("L" if channels == 1 else "RGB")
    img = img.resize((image_size, image_size), RESAMPLE)
    arr = np.asarray(img, dtype=np.uint8)
    return arr[:, :, None] if channels == 1 else arr


def _per_channel(values, channels: int) -> np.ndarray:
    values = list(values)
    return np.asarray(values * channels if len(values) == 1 else values, np.float32)


def normalize(batch: np.ndarray, mean, std) -> np.ndarray:
    """uint8 NHWC -> float32 NCHW: pixel / 255, then (x - mean) / std per channel."""
    c = batch.shape[-1]
    x = (batch.astype(np.float32) / 255.0 - _per_channel(mean, c)) / _per_channel(std, c)
    return x.transpose(0, 3, 1, 2).copy()


def preprocess(images: list, preprocessing: dict) -> np.ndarray:
    """Images (bytes, paths or PIL images) -> the float32 NCHW batch the network takes."""
    c, size = preprocessing["channels"], preprocessing["image_size"]
    batch = np.stack([to_array(open_image(im), c, size) for im in images])
    return normalize(batch, preprocessing["mean"], preprocessing["std"])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def is_missing(value) -> bool:
    """None, NaN, empty bytes or an empty string: no value in this cell."""
    if value is None:
        return True
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) == 0
    if isinstance(value, str):
        return value == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def image_sources(model_input) -> list:
    """One source per row: the row's `image` bytes, else its `path`."""
    if isinstance(model_input, dict):
        model_input = pd.DataFrame(model_input)
    if not isinstance(model_input, pd.DataFrame):
        raise TypeError(f"expected a DataFrame with a column '{IMAGE}' (image file bytes) or "
                        f"'{PATH}', got {type(model_input).__name__}")
    if IMAGE not in model_input.columns and PATH not in model_input.columns:
        raise ValueError(f"the input needs a column '{IMAGE}' (image file bytes) or '{PATH}' "
                         f"(image file paths); got columns {list(model_input.columns)}")
    n = len(model_input)
    images = model_input[IMAGE].tolist() if IMAGE in model_input.columns else [None] * n
    paths = model_input[PATH].tolist() if PATH in model_input.columns else [None] * n
    return [im if not is_missing(im) else (p if not is_missing(p) else None)
            for im, p in zip(images, paths)]


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Decode, preprocess and classify; the network is loaded in `load_context`."""

    def load_context(self, context):
        import torch

        cfg = context.model_config or {}
        self.class_names = [str(c) for c in cfg["class_names"]]
        self.preprocessing = dict(cfg["preprocessing"])
        # No global torch.set_grad_enabled(False): the loading process may train afterwards.
        # Inference runs under no_grad (probabilities).
        self._net = torch.export.load(context.artifacts[WEIGHTS]).module()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> (n, classes) probabilities."""
        import torch

        with torch.no_grad():
            logits = self._net(torch.from_numpy(batch))
        return softmax(logits.double().numpy())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        return self.classify(image_sources(model_input))

    def classify(self, sources: list) -> pd.DataFrame:
        classes, prep = self.class_names, self.preprocessing
        c, size = prep["channels"], prep["image_size"]
        probs = np.full((len(sources), len(classes)), np.nan)
        errors: list[str | None] = [None] * len(sources)
        for start in range(0, len(sources), BATCH_SIZE):
            arrays, rows = [], []
            for i in range(start, min(start + BATCH_SIZE, len(sources))):
                if sources[i] is None:
                    errors[i] = f"no image: neither '{IMAGE}' nor '{PATH}' is given"
                    continue
                try:
                    img = open_image(sources[i])
                    try:
                        arrays.append(to_array(img, c, size))
                    finally:
                        if img is not sources[i]:
                            img.close()
                    rows.append(i)
                except Exception as e:  # PIL raises many types for broken files
                    errors[i] = f"{type(e).__name__}: {_BYTES_REPR.sub('', str(e))}"
            if rows:
                probs[rows] = self.probabilities(
                    normalize(np.stack(arrays), prep["mean"], prep["std"]))
        return _frame(probs, errors, classes)


def _frame(probs: np.ndarray, errors: list, classes: list[str]) -> pd.DataFrame:
    ok = np.array([e is None for e in errors], dtype=bool)
    best = np.where(ok, np.nan_to_num(probs, nan=-1.0).argmax(axis=1), -1)
    columns = {PREDICTION: [classes[k] if k >= 0 else None for k in best],
               PROBABILITY: [float(p[k]) if k >= 0 else None for k, p in zip(best, probs)]}
    for j, name in enumerate(classes):
        columns[PROB_PREFIX + name] = [float(p) if good else None
                                       for p, good in zip(probs[:, j], ok)]
    columns[ERROR] = list(errors)
    # object columns keep None (JSON null; NaN is not JSON) where a row failed
    frame = pd.DataFrame({k: pd.Series(v, dtype=object) for k, v in columns.items()})
    if ok.all():
        frame = frame.astype({col: np.float64 for col in frame.columns[1:-1]})
        frame[PREDICTION] = frame[PREDICTION].astype(str)
    return frame


mlflow.models.set_model(ImageClassifier())
