"""visiontune's registered model: raw images in, classes out (MLflow models-from-code).

MLflow copies this file into every model visiontune logs and runs it when the model is loaded
(`mlflow.pyfunc.load_model`, `mlflow models serve`, `mlflow models build-docker`), in a process
that may know nothing of visiontune. So it imports only torch, numpy, PIL, pandas and mlflow,
and it carries the whole eval-time preprocessing.

Input: a DataFrame, one row per image, with a column `image` (the bytes of an image file:
JPEG, PNG, GIF, BMP, WEBP or TIFF; over HTTP, base64 in JSON, which MLflow's scoring server
decodes for a `binary` column) and/or a column `path`, used for rows whose `image` is empty.

The model reads only what it is sent. A `path` is refused unless the process that serves the
model names the folders it may read in `VISIONTUNE_ALLOWED_PATH_ROOTS` (os.pathsep-separated);
then only a regular file whose resolved path lies under one of them is read (no symlink out,
no FIFO, no device). A refused path gets the same error whether or not it exists, so a client
learns nothing of the server's files. At most `VISIONTUNE_MAX_IMAGES_PER_REQUEST` rows (default
1,024) per call; every image within the decoding limits of `preprocessing.py`, and the
request's images within its pixel budget (`VISIONTUNE_MAX_REQUEST_PIXELS`: the rows after it
is spent get an error).

Output: a DataFrame, one row per input row, in order:
  prediction     the class name with the highest probability
  probability    its probability
  prob_<class>   the probability of each class, in the model's class order
  error          null, or why this row's image could not be read (then the others are null):
                 one bad image does not fail the batch.

Preprocessing (the training pipeline's eval transform, parameters in
`model_config["preprocessing"]`) is the code the training pipeline itself loads images with:
`components/imaging.py`, logged with the model as the artifact `preprocessing` (`preprocessing.py`)
and loaded from there under a name of its own (two models in one process keep their own
copies). The network is a torch.export program (artifact `weights`) that returns logits;
softmax gives probabilities.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import stat

import mlflow
import numpy as np
import pandas as pd

WEIGHTS = "weights"           # artifact key of the torch.export program (.pt2)
PREPROCESSING = "preprocessing"  # artifact key of the preprocessing module (.py)
IMAGE, PATH = "image", "path"  # input columns
PREDICTION, PROBABILITY, ERROR = "prediction", "probability", "error"
PROB_PREFIX = "prob_"
BATCH_SIZE = 64               # images decoded and run at once: bounds memory per request
_BYTES_REPR = re.compile(r" <_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # PIL's name for bytes
PATH_ROOTS_ENV = "VISIONTUNE_ALLOWED_PATH_ROOTS"
MAX_ROWS_ENV = "VISIONTUNE_MAX_IMAGES_PER_REQUEST"
DEFAULT_MAX_ROWS = 1024
PATHS_OFF = (f"PathRefused: this model reads image bytes (column '{IMAGE}'), not paths; the "
             f"server allows paths only under the folders in {PATH_ROOTS_ENV}")
PATH_REFUSED = (f"PathRefused: not a regular file under the folders this server allows "
                f"({PATH_ROOTS_ENV})")


class PathRefused(ValueError):
    pass


def allowed_roots() -> list[str]:
    """The folders `path` rows may name, resolved; none unless the operator sets them."""
    value = os.environ.get(PATH_ROOTS_ENV, "")
    return [os.path.realpath(r) for r in value.split(os.pathsep) if r.strip()]


def read_allowed_file(path: str, roots: list[str], max_bytes: int) -> bytes:
    """The bytes of `path` if it resolves to a regular file under one of `roots`; else
    PathRefused with one text for every reason (missing, outside, symlink out, FIFO, device,
    folder), so that the answer says nothing about what exists."""
    if not roots:
        raise PathRefused(PATHS_OFF)

    def inside(p: str) -> bool:
        return any(p == r or p.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

    real = os.path.realpath(str(path))
    if not inside(real):
        raise PathRefused(PATH_REFUSED)
    try:
        # Not even opened unless it is a regular file (opening a device can act on it)...
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise PathRefused(PATH_REFUSED)
        # ... and checked again on what was opened. O_NONBLOCK: opening a FIFO (swapped in
        # since) must not wait for a writer; O_NOFOLLOW: the resolved name cannot have become
        # a symlink since.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise PathRefused(PATH_REFUSED) from None
    try:
        # A folder on the way may have been swapped for a symlink since realpath: what was
        # opened must itself lie under a root (Linux names it in /proc/self/fd).
        opened = f"/proc/self/fd/{fd}"
        if os.path.exists(opened) and not inside(os.path.realpath(opened)):
            raise PathRefused(PATH_REFUSED)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathRefused(PATH_REFUSED)
        if info.st_size > max_bytes:
            raise PathRefused(f"PathRefused: the file is larger than {max_bytes:,} bytes")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(max_bytes + 1)
    finally:
        os.close(fd)


def output_columns(class_names: list[str]) -> list[str]:
    return [PREDICTION, PROBABILITY, *(PROB_PREFIX + c for c in class_names), ERROR]


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


def load_module(path: str):
    """The Python file at `path` as a module named after its path: not `import preprocessing`,
    which would give every later model in this process the first one's copy."""
    name = "visiontune_model_" + hashlib.sha1(str(path).encode()).hexdigest()[:16]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Decode, preprocess and classify; the network and the preprocessing code are loaded in
    `load_context`."""

    def load_context(self, context):
        import torch

        cfg = context.model_config or {}
        self.class_names = [str(c) for c in cfg["class_names"]]
        self.preprocessing = dict(cfg["preprocessing"])
        self.prep = load_module(context.artifacts[PREPROCESSING])
        # No global torch.set_grad_enabled(False): the loading process may train afterwards.
        # Inference runs under no_grad (probabilities).
        self._net = torch.export.load(context.artifacts[WEIGHTS]).module()

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """float32 NCHW -> (n, classes) probabilities."""
        import torch

        with torch.no_grad():
            logits = self._net(torch.from_numpy(batch))
        return self.prep.softmax(logits.double().numpy())

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        sources = image_sources(model_input)
        limit = int(os.environ.get(MAX_ROWS_ENV, "") or DEFAULT_MAX_ROWS)
        if len(sources) > limit:
            raise ValueError(f"{len(sources):,} images in one request; at most {limit:,} "
                             f"({MAX_ROWS_ENV}): send them in smaller batches")
        return self.classify(sources)

    def classify(self, sources: list) -> pd.DataFrame:
        classes, prep, code = self.class_names, self.preprocessing, self.prep
        c, size = prep["channels"], prep["image_size"]
        probs = np.full((len(sources), len(classes)), np.nan)
        errors: list[str | None] = [None] * len(sources)
        roots = allowed_roots()
        # A model's own copies of this file and of preprocessing.py are logged together: its
        # preprocessing always has the budget this code spends.
        budget = code.max_request_pixels()
        for start in range(0, len(sources), BATCH_SIZE):
            arrays, rows = [], []
            for i in range(start, min(start + BATCH_SIZE, len(sources))):
                if sources[i] is None:
                    errors[i] = f"no image: neither '{IMAGE}' nor '{PATH}' is given"
                    continue
                source = sources[i]
                try:
                    if isinstance(source, (str, os.PathLike)):  # read only if allowed
                        source = read_allowed_file(source, roots, code.max_image_bytes())
                    img = code.open_image(source, size, pixels_left=budget)
                    budget -= img.size[0] * img.size[1]
                    try:
                        arrays.append(code.to_array(img, c, size))
                    finally:
                        if img is not source:
                            img.close()
                    rows.append(i)
                except PathRefused as e:
                    errors[i] = str(e)
                except Exception as e:  # PIL raises many types for broken files
                    errors[i] = f"{type(e).__name__}: {_BYTES_REPR.sub('', str(e))}"
            if rows:
                probs[rows] = self.probabilities(
                    code.normalize(np.stack(arrays), prep["mean"], prep["std"]))
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
