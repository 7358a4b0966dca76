"""The one MLflow adapter: `client` (`Tracker`), `server` (is the server there: the start-up
check, the store watch, bounded retries), `journal` (what is logged while it is not) and
`record` (a trial's epochs, the pipeline's parent run). Logging the registered model itself is
`components.serving.packaging`."""

from components.errors import first_line
from components.tracking.client import (
    CONFIG_FILE,
    DATASET_CONTEXT_TAG,
    DATASET_DIGEST_CHARS,
    DATASET_RACE_RETRIES,
    PARENT_RUN_ID_TAG,
    PIPELINE_ID_TAG,
    ROLE_TAG,
    RUNNING,
    STEP_TAG,
    TRIAL_ID_TAG,
    Tracker,
    flatten,
)
from components.tracking.journal import Journal, JournalError
from components.tracking.record import EpochLogger, PipelineRecord
from components.tracking.server import (
    HTTP_RETRY_ENV,
    StoreWatch,
    TrackingError,
    bound_http_retries,
    check_tracking_uri,
    wait_and_send,
)

__all__ = ["CONFIG_FILE", "DATASET_CONTEXT_TAG", "DATASET_DIGEST_CHARS", "DATASET_RACE_RETRIES",
           "HTTP_RETRY_ENV", "PARENT_RUN_ID_TAG", "PIPELINE_ID_TAG", "ROLE_TAG", "RUNNING",
           "STEP_TAG", "TRIAL_ID_TAG", "EpochLogger", "Journal", "JournalError",
           "PipelineRecord", "StoreWatch", "Tracker", "TrackingError", "bound_http_retries",
           "check_tracking_uri", "first_line", "flatten", "wait_and_send"]
