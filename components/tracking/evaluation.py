"""MLflow's own evaluation of a registered version's test predictions, beside ours.

`mlflow.models.evaluate` in static-dataset mode (predictions and targets given, no model
called): MLflow's classifier metrics (`mlflow_test_f1_score`, ...: its default averaging,
weighted for several classes) and its confusion matrix, linked to the LoggedModel, so
MLflow's evaluation views and `mlflow.validate_evaluation_results` users see the standard
numbers. The paired decision of `promote` stays the authority (docs/promotion.md says why).
"""

from __future__ import annotations

import logging
import threading
import warnings

PREFIX = "mlflow_test_"


def log_mlflow_evaluation(tracking_uri: str, run_id: str, predictions, classes: list[str],
                          model_id: str | None, dataset_name: str) -> dict[str, float]:
    """Evaluate `predictions` (columns label, prediction: class names) into `run_id`; returns
    MLflow's metrics. MLflow logs the frame as a dataset of the run (`dataset_name`, context
    the metric prefix). `mlflow.models.evaluate` logs to the fluent active run and ending that
    would end the pipeline's run: it runs in a thread of its own, whose active-run stack
    (thread-local in MLflow) holds the run and is dropped with the thread, the run still open."""
    import mlflow
    import pandas as pd

    index = {c: i for i, c in enumerate(classes)}
    frame = pd.DataFrame({"label": [index[c] for c in predictions["label"]],
                          "prediction": [index[c] for c in predictions["prediction"]]})
    out: dict = {}

    def run_evaluation() -> dict:
        mlflow.set_tracking_uri(tracking_uri)
        mlflow.start_run(run_id=run_id)
        data = mlflow.data.from_pandas(frame, name=dataset_name, targets="label",
                                       predictions="prediction")
        result = mlflow.models.evaluate(
            data=data, model_type="classifier",
            model_id=model_id, evaluator_config={
                "metric_prefix": PREFIX, "log_model_explainability": False,
                "label_list": list(range(len(classes)))})
        return dict(result.metrics)

    def evaluate() -> None:
        # MLflow's evaluator narrates (schema hints, the model type it infers from integer
        # labels, "testing metrics on first row"): none of it is news on the pipeline's console
        quiet = [logging.getLogger(n) for n in ("mlflow.models.evaluation", "mlflow.types",
                                                 "mlflow.data")]
        levels = [logger.level for logger in quiet]
        root = logging.getLogger()
        root_handlers, root_level = list(root.handlers), root.level
        try:
            for logger in quiet:
                logger.setLevel(logging.ERROR)
            # the caller's thread waits in join(): the process-wide filters are ours meanwhile
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out["metrics"] = run_evaluation()
        except BaseException as e:   # raised again in the caller's thread
            out["error"] = e
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
            # mlflow.pytorch's autolog module, which evaluate imports, calls basicConfig: the
            # root logger is put back, or each console line after it (they propagate, see
            # pipelines/console.py) would be printed a second time, on stderr
            for handler in [h for h in root.handlers if h not in root_handlers]:
                root.removeHandler(handler)
            root.setLevel(root_level)

    worker = threading.Thread(target=evaluate, name="mlflow-evaluate")
    worker.start()
    worker.join()
    if "error" in out:
        raise out["error"]
    return out["metrics"]
