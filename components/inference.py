"""Classify raw images with a logged model: the preprocessing comes from the model's own
metadata, so a model registered by any version of visiontune classifies the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from components.augment import normalize_batch
from components.data.dataset import load_image
from components.data.ingest import IMAGE_EXTENSIONS


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; folders walked recursively for image files (hidden ones skipped)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(str(f) for f in p.rglob("*") if f.is_file()
                          and f.suffix.lower() in IMAGE_EXTENSIONS
                          and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            out.append(str(p))
        else:
            raise FileNotFoundError(f"{p} does not exist")
    return out


def preprocess(images: list, preprocessing: dict) -> np.ndarray:
    """Paths or PIL images (any size, any mode) -> the float32 NCHW batch the model takes."""
    c, size = preprocessing["channels"], preprocessing["image_size"]
    batch = np.stack([load_image(im, c, size) for im in images])
    return normalize_batch(batch, preprocessing["mean"], preprocessing["std"])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classify_files(model, paths: list[str], batch_size: int = 64
                   ) -> tuple[list[tuple[str, str, float]], list[tuple[str, str]]]:
    """Classify image files; a file that does not decode is skipped, not fatal. Returns
    ([(path, class, probability)], [(path, reason skipped)])."""
    rows, skipped = [], []
    for i in range(0, len(paths), batch_size):
        images, kept = [], []
        for path in paths[i:i + batch_size]:
            try:
                with Image.open(path) as im:
                    im.load()  # decode now: a truncated file fails here, not in the batch
                    images.append(im.copy())
                kept.append(path)
            except Exception as e:  # PIL raises many types for broken files
                skipped.append((path, f"{type(e).__name__}: {e}"))
        if images:
            rows += [(p, label, prob) for p, (label, prob) in
                     zip(kept, classify(model, images, batch_size))]
    return rows, skipped


def classify(model, images: list, batch_size: int = 64) -> list[tuple[str, float]]:
    """`model`: an `mlflow.pyfunc` model logged by visiontune. Returns (class, probability)."""
    meta = model.metadata.metadata or {}
    if "preprocessing" not in meta or "class_names" not in meta:
        raise ValueError("this model has no visiontune metadata (class_names, preprocessing)")
    classes = meta["class_names"]
    out = []
    for i in range(0, len(images), batch_size):
        chunk = images[i:i + batch_size]
        if any(isinstance(im, (str, Path)) for im in chunk):
            chunk = [Image.open(im) if isinstance(im, (str, Path)) else im for im in chunk]
        probs = softmax(np.asarray(model.predict(preprocess(chunk, meta["preprocessing"]))))
        out += [(classes[k], float(p[k])) for k, p in zip(probs.argmax(1), probs)]
    return out
