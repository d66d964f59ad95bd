"""The logger group (conf/logger/): the experiment stores a run reports to besides
TensorBoard, which always writes. Each option turns its store on (``logger=mlflow``),
and several may be chosen at once (``logger=[mlflow,wandb]``): their keys sit side by
side here."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check, check_choice

STORES = ("csv", "mlflow", "wandb")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LoggerConfig:
    csv: bool = False  # logger=csv: metrics.csv in the run folder, one row per epoch
    mlflow: bool = False  # logger=mlflow: one MLflow run per stable-cnn run
    wandb: bool = False  # logger=wandb: one Weights & Biases run per stable-cnn run
    # the MLflow store: null = $MLFLOW_TRACKING_URI, else sqlite:///outputs/mlflow.db
    tracking_uri: str | None = None
    # the MLflow experiment: null = the experiment preset's name, else stable-cnn
    experiment: str | None = None
    log_checkpoint: bool = False  # best.pt as an artifact (MLflow) or a model artifact (W&B)
    project: str | None = None  # the W&B project: null = as logger.experiment
    entity: str | None = None  # the W&B team or user (null: the logged-in user's default)
    mode: str | None = None  # W&B: online | offline | disabled; null = $WANDB_MODE, else online

    def __post_init__(self) -> None:
        if self.mode is not None:
            check_choice("logger.mode", self.mode, WANDB_MODES)
        for key in ("experiment", "project"):
            value = getattr(self, key)
            check(value is None or bool(value.strip()), f"logger.{key}", value, "give a name")

    @property
    def trackers(self) -> tuple[str, ...]:
        """The stores turned on, besides TensorBoard."""
        return tuple(name for name in STORES if getattr(self, name))
