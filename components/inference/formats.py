"""Which registered models visiontune can classify with, as a model whose `predict` takes
image bytes or paths (a DataFrame, the model file's input) and returns the model file's output
frame.

A model logged by visiontune is an MLflow pyfunc from code (`components/serving/
image_classifier.py`): it takes image bytes or paths, decodes and preprocesses them itself and
returns one row per image (`prediction`, `probability`, `prob_<class>`..., `error`); it is used
as it is.

Models registered by visiontune before that (MLflow's `pytorch` flavour, pt2 format, taking a
preprocessed float32 NCHW tensor and returning logits) are still classified: the same code
decodes and preprocesses with the preprocessing recorded in their metadata, only the forward
pass is theirs. Anything else is refused with one line (`ValueError`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from components import imaging
from components.imaging import softmax
from components.serving import MODEL_FORMAT
from components.serving import image_classifier as _model_code


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
