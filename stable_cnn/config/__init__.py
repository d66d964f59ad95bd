"""Typed schema of the Hydra config: one dataclass per config-group option.

Each YAML in conf/<group>/ names its schema in its defaults list
(``- /schema_sgd@_here_``), so Hydra checks keys and types while composing
(``optimizer.lr=abc`` or ``optimizer.foo=1`` fail before anything runs). Ranges
are checked in ``__post_init__``, which runs when the train command turns the
composed config into these objects; that too happens before any data is read.
The schemas live at the root of the ConfigStore, not in a group, so that
``--help`` lists only the real options.

One module per config group (conf/<group>/ <-> stable_cnn/config/<group>.py; the amp group
is precision.py), the whole run's config in run.py; every schema is importable from here.
"""

from stable_cnn.config.clipping import ClippingConfig
from stable_cnn.config.data import (
    CachedDataConfig,
    CustomDataConfig,
    DataConfig,
    ImageFolderConfig,
    SyntheticDataConfig,
)
from stable_cnn.config.diagnostics import DiagnosticsConfig
from stable_cnn.config.ema import EmaConfig
from stable_cnn.config.logger import LoggerConfig
from stable_cnn.config.lr_find import LRFindConfig
from stable_cnn.config.model import (
    CustomModelConfig,
    ModelConfig,
    ResNetConfig,
    SmallCNNConfig,
    TimmConfig,
)
from stable_cnn.config.optimizer import (
    OPTIMIZER_OPTIONS,
    AdamWConfig,
    MuonConfig,
    OptimizerConfig,
    SGDConfig,
)
from stable_cnn.config.precision import AmpConfig
from stable_cnn.config.run import (
    DATA_OVERRIDES,
    SCHEMAS,
    TAKES_KWARGS,
    RunConfig,
    register_schemas,
    schema_of,
)
from stable_cnn.config.scheduler import (
    SCHEDULER_OPTIONS,
    CosineConfig,
    OneCycleConfig,
    PlateauConfig,
    SchedulerConfig,
    StepConfig,
)
from stable_cnn.config.trainer import TrainerConfig

__all__ = [
    "DATA_OVERRIDES",
    "OPTIMIZER_OPTIONS",
    "SCHEDULER_OPTIONS",
    "SCHEMAS",
    "TAKES_KWARGS",
    "AdamWConfig",
    "AmpConfig",
    "CachedDataConfig",
    "ClippingConfig",
    "CosineConfig",
    "CustomDataConfig",
    "CustomModelConfig",
    "DataConfig",
    "DiagnosticsConfig",
    "EmaConfig",
    "ImageFolderConfig",
    "LRFindConfig",
    "LoggerConfig",
    "ModelConfig",
    "MuonConfig",
    "OneCycleConfig",
    "OptimizerConfig",
    "PlateauConfig",
    "ResNetConfig",
    "RunConfig",
    "SGDConfig",
    "SchedulerConfig",
    "SmallCNNConfig",
    "StepConfig",
    "SyntheticDataConfig",
    "TimmConfig",
    "TrainerConfig",
    "register_schemas",
    "schema_of",
]
