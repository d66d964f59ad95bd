"""The whole composed config, typed (RunConfig), and the schemas Hydra checks it against."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from stable_cnn.config.clipping import ClippingConfig
from stable_cnn.config.data import (
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
from stable_cnn.config.optimizer import AdamWConfig, MuonConfig, OptimizerConfig, SGDConfig
from stable_cnn.config.precision import AmpConfig
from stable_cnn.config.scheduler import (
    CosineConfig,
    OneCycleConfig,
    PlateauConfig,
    SchedulerConfig,
    StepConfig,
)
from stable_cnn.config.trainer import TrainerConfig

# The options whose extra keys (+model.KEY=VALUE, +data.KEY=VALUE) are keyword arguments
# of their callable: timm's create_model, your model's, your dataset's.
TAKES_KWARGS = (TimmConfig, CustomModelConfig, CustomDataConfig)

SCHEMAS: dict[str, type] = {
    "schema_data": DataConfig,
    "schema_data_synthetic": SyntheticDataConfig,
    "schema_data_custom": CustomDataConfig,
    "schema_data_image_folder": ImageFolderConfig,
    "schema_model_small_cnn": SmallCNNConfig,
    "schema_model_resnet": ResNetConfig,
    "schema_model_timm": TimmConfig,
    "schema_model_custom": CustomModelConfig,
    "schema_sgd": SGDConfig,
    "schema_adamw": AdamWConfig,
    "schema_muon": MuonConfig,
    "schema_cosine": CosineConfig,
    "schema_plateau": PlateauConfig,
    "schema_step": StepConfig,
    "schema_onecycle": OneCycleConfig,
    "schema_scheduler_none": SchedulerConfig,
    "schema_clipping": ClippingConfig,
    "schema_amp": AmpConfig,
    "schema_ema": EmaConfig,
    "schema_trainer": TrainerConfig,
    "schema_diagnostics": DiagnosticsConfig,
    "schema_logger": LoggerConfig,
    "schema_lr_find": LRFindConfig,  # stable-cnn-lr-find's own keys (conf/lr_find.yaml)
}


@dataclass
class RunConfig:
    """The composed config, typed and range-checked."""

    data: DataConfig
    model: ModelConfig
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    clipping: ClippingConfig
    amp: AmpConfig
    ema: EmaConfig
    trainer: TrainerConfig
    diagnostics: DiagnosticsConfig
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # stores beside TensorBoard


# stable-cnn-eval's `data` before any data group is chosen: every data.* key, unset
# (MISSING), so that `data.root=...` alone changes the checkpoint's own data
# (conf/eval.yaml). A plain mapping of MISSING, so that a data group chosen on top
# merges into it whatever its types.
DATA_OVERRIDES = {f.name: MISSING for f in fields(DataConfig)}


# The options whose YAML may hold the callable's arguments as plain keys beside
# ``_target_`` (``model: {_target_: mynets.Net, depth: 3}``): their schema gives Hydra its
# keys and defaults, but not its types, while it composes (a typed node refuses a key it
# does not know), and parse_run_config types them afterwards, the extra keys becoming
# the callable's keyword arguments.
UNTYPED_WHILE_COMPOSED = {"schema_model_custom", "schema_data_custom"}


def register_schemas() -> None:
    """Store every schema at the ConfigStore's root, where the YAML defaults find it."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        node = untyped(schema) if name in UNTYPED_WHILE_COMPOSED else schema
        store.store(name=name, node=node)
    store.store(name="schema_data_overrides", node=DATA_OVERRIDES)


def untyped(schema: type) -> dict:
    """A schema's keys and defaults as a plain mapping (MISSING stays required)."""
    return OmegaConf.to_container(OmegaConf.structured(schema), resolve=False)


def schema_of(group: str, values: dict) -> type | None:
    """The schema an untyped group's composed values belong to (parse_run_config)."""
    if "_target_" not in values:  # the two options that call something of yours have one
        return None
    return {"model": CustomModelConfig, "data": CustomDataConfig}.get(group)
