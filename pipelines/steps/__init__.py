"""The steps of the training pipeline, each a function with typed inputs and outputs.

Every step records its result on the pipeline's MLflow parent run (a `PipelineRecord`) and
marks itself done there; a resumed run recovers a done step's result from that record instead
of recomputing or re-logging it. `pipelines.training` only sequences these. A step logs the
lines a person follows through its module's logger (`pipelines/console.py` prints them).

  plan_search(cfg)                                -> SearchPlan        (nothing recorded)
  prepare_data(cfg, record)                       -> PreparedData      data/ artifacts
    = ingest -> Ingested, validate -> Validated (the decoded stores), split -> SplitManifest
  tune_trials(cfg, plan, data, record)            -> list[TrialResult] trial child runs
  evaluate_best(cfg, plan, data, trials, record)  -> Evaluation        evaluation/ artifacts
  register_best(cfg, manifest, evaluation, record) -> RegisteredVersion model + registry

`--extend ID` (`extend`): begin_extension after the data check, then tune, evaluate and
register again under the extension's step names (`tune-x1`, ...).
"""

from pipelines.steps.common import (
    SearchPlan,
    git_commit,
    new_pipeline_id,
    open_record,
    plan_search,
)
from pipelines.steps.data import (
    DATASET_CONTEXTS,
    DECODED_TAG,
    Ingested,
    PreparedData,
    Validated,
    ingest,
    log_split_datasets,
    prepare_data,
    split,
    test_dataset_name,
    validate,
)
from pipelines.steps.evaluate import (
    Evaluation,
    evaluate_best,
    log_search_review,
    sweep_importance,
)
from pipelines.steps.extend import (
    Extension,
    begin_extension,
    best_so_far,
    extension_of,
    extension_pending,
    warm_start_seeds,
)
from pipelines.steps.register import MODEL_URI_TAG, NOTE_TAG, VERSION_TAG, register_best
from pipelines.steps.tune import SearchStopped, model_sizes, tune_trials

__all__ = ["DATASET_CONTEXTS", "DECODED_TAG", "MODEL_URI_TAG", "NOTE_TAG",
           "VERSION_TAG", "Evaluation", "Extension", "Ingested", "PreparedData",
           "SearchPlan", "SearchStopped", "Validated", "ingest", "split", "validate",
           "begin_extension", "best_so_far", "evaluate_best", "extension_of",
           "extension_pending", "git_commit",
           "log_search_review", "log_split_datasets", "model_sizes", "new_pipeline_id",
           "open_record", "plan_search", "prepare_data", "register_best", "sweep_importance",
           "test_dataset_name", "tune_trials", "warm_start_seeds"]
