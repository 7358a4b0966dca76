"""What a training run is given and what it reports: `TrainJob` (one trial's config sections,
its data rows and where rank 0 logs; pickled to every Ray worker, so a dataclass at module
level) and `EpochMetrics` (one epoch's report to Ray and its metrics in MLflow: the one
definition of the metric names the tuning code reads)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from components.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig

if TYPE_CHECKING:
    import ray.train

    from components.tracking import Tracker


@dataclass
class TrainJob:
    """Everything one Ray Train run needs: the config sections of one trial, the data rows,
    and where rank 0 logs (an MLflow run the trial driver created)."""

    data: DataConfig
    augment: AugmentConfig
    model: ModelConfig
    train: TrainConfig
    average: str
    seed: int
    train_rows: tuple[list[str], list[int]]
    val_rows: tuple[list[str], list[int]]
    num_classes: int
    tracker: Tracker | None = None   # the run's (with its journal)
    mlflow_run_id: str | None = None
    metric_prefix: str = ""   # "fold2/" when the run is one fold of a cross-validation
    log_augmented_samples: bool = False   # only a trial that searches the augmentation
    decoded: tuple = ()   # the sweep's stores of decoded images (components.data.preprocessed)
    group_keys: dict = field(default_factory=dict)   # path -> its copy group (k-fold)
    resume_from: ray.train.Checkpoint | None = None   # when Ray's list was torn (driver._fit)
    system_metrics_s: float = 10.0   # rank 0 samples CPU, memory (GPU) this often; 0: off


@dataclass
class EpochMetrics:
    """What one epoch reports to Ray (every key) and logs to MLflow (all but `epoch` and
    `early_stopped`, which the MLflow step and the run's status already say)."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_precision: float
    val_recall: float
    val_f1: float
    lr: float
    best_val_f1: float
    best_val_loss: float
    best_epoch: int
    early_stopped: int
    # the run's cost: the most memory any rank held, and its start-up
    peak_rss_mb: float = 0.0
    time_to_first_batch_s: float = 0.0
    data_rss_mb: float = 0.0
    images_decoded: int = 0   # files rank 0 decoded so far (0 with the sweep's store)

    def report(self) -> dict:
        return asdict(self)

    def logged(self, prefix: str = "") -> dict:
        return {prefix + k: v for k, v in asdict(self).items()
                if k not in ("epoch", "early_stopped")}
