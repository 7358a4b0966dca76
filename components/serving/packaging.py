"""Logging a trained network as visiontune's registered image classifier (the pyfunc model
whose code is `image_classifier.py`). Not part of the model: it runs where the model is made."""

from __future__ import annotations

from pathlib import Path

import mlflow

from components.tracking import Tracker


def log_image_classifier(tracker: Tracker, run_id: str, model, class_names: list[str],
                         preprocessing: dict, metadata: dict, name: str = "model") -> str:
    """Log `model` (an nn.Module returning logits, eval mode) as visiontune's image
    classifier: an MLflow pyfunc from code (`components/serving/image_classifier.py`,
    copied into the model) that takes raw image bytes or paths and carries its own
    preprocessing, and the network as a torch.export program (artifact `weights`), so
    `mlflow models serve` and `mlflow.pyfunc.load_model` need nothing from this repository.
    Returns the model URI."""
    import copy
    import shutil
    import tempfile

    import pandas as pd
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema

    from components.serving import (
        MODEL_CODE,
        MODEL_FORMAT,
        PREPROCESSING_CODE,
        PREPROCESSING_FILE,
        WEIGHTS_FILE,
        example_image_bytes,
        export_network,
        pip_requirements,
    )

    c, size = preprocessing["channels"], preprocessing["image_size"]
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.binary, "image", required=False),
                       ColSpec(DataType.string, "path", required=False)]),
        outputs=Schema([ColSpec(DataType.string, "prediction"),
                        ColSpec(DataType.double, "probability"),
                        *(ColSpec(DataType.double, f"prob_{k}") for k in class_names),
                        ColSpec(DataType.string, "error", required=False)]))
    mlflow.set_tracking_uri(tracker.uri)
    with tempfile.TemporaryDirectory() as d:
        weights = export_network(model, c, size, Path(d) / WEIGHTS_FILE)
        # components/imaging.py, under the name every version's copy has
        code = Path(d) / PREPROCESSING_FILE
        shutil.copyfile(PREPROCESSING_CODE, code)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(MODEL_CODE), artifacts={"weights": str(weights),
                                                 "preprocessing": str(code)},
                model_config={"class_names": [str(k) for k in class_names],
                              "preprocessing": copy.deepcopy(preprocessing)},
                signature=signature,
                input_example=pd.DataFrame({"image": [example_image_bytes(c, size)]}),
                metadata={**metadata, "model_format": MODEL_FORMAT},
                pip_requirements=pip_requirements())
    # start_run(run_id=...) ends the run on exit; the pipeline decides its final status.
    tracker.client.update_run(run_id, status="RUNNING")
    return info.model_uri


def inspect_logged_model(tracker: Tracker, model_uri: str):
    """The logged model read back from the artifact store, as every loader will read it: the
    sha256 of each of its files (`components.serving.code_digests`, the registry tag value)
    and its measured speed and size (`components.serving.speed.Speed`)."""
    import tempfile

    from components.serving import code_digests, format_digests
    from components.serving.speed import measure_speed

    with tempfile.TemporaryDirectory() as d:
        local = tracker.download_model(model_uri, d)
        return format_digests(code_digests(local)), measure_speed(local)
