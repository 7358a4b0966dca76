"""The one MLflow adapter: `client` (the URI check, retries, the store watch, `Tracker`) and
`record` (a trial's epochs, the pipeline's parent run). Logging the registered model itself is
`components.serving.packaging`."""

from components.tracking.client import (
    CONFIG_FILE,
    DATASET_CONTEXT_TAG,
    DATASET_DIGEST_CHARS,
    DATASET_RACE_RETRIES,
    HTTP_RETRY_ENV,
    PARENT_RUN_ID_TAG,
    PIPELINE_ID_TAG,
    ROLE_TAG,
    RUNNING,
    STEP_TAG,
    TRIAL_ID_TAG,
    StoreWatch,
    Tracker,
    TrackingError,
    bound_http_retries,
    check_tracking_uri,
    first_line,
    flatten,
)
from components.tracking.record import EpochLogger, PipelineRecord

__all__ = ["CONFIG_FILE", "DATASET_CONTEXT_TAG", "DATASET_DIGEST_CHARS", "DATASET_RACE_RETRIES",
           "HTTP_RETRY_ENV", "PARENT_RUN_ID_TAG", "PIPELINE_ID_TAG", "ROLE_TAG", "RUNNING",
           "STEP_TAG", "TRIAL_ID_TAG", "EpochLogger", "PipelineRecord", "StoreWatch", "Tracker",
           "TrackingError", "bound_http_retries", "check_tracking_uri", "first_line", "flatten"]
