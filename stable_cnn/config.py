"""Typed schema of the Hydra config: one dataclass per config-group option.

Each YAML in conf/<group>/ names its schema in its defaults list
(``- /schema_sgd@_here_``), so Hydra checks keys and types while composing
(``optimizer.lr=abc`` or ``optimizer.foo=1`` fail before anything runs). Ranges
are checked in ``__post_init__``, which runs when ``train.py`` turns the
composed config into these objects; that too happens before any data is read.
The schemas live at the root of the ConfigStore, not in a group, so that
``--help`` lists only the real options.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from stable_cnn.errors import ConfigError


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, value, "use one of " + ", ".join(choices))


# The options of the groups whose schemas share a class; tests/test_config.py checks that
# they match conf/<group>/.
OPTIMIZER_OPTIONS = ("adamw", "sgd", "tutorial_sgd")
SCHEDULER_OPTIONS = ("cosine", "none", "onecycle", "plateau", "step", "tutorial_cosine")


def _check_kind(group: str, config: Any, kind: str, options: tuple[str, ...]) -> None:
    """``<group>.name`` says which kind of optimizer or schedule the option builds; it is
    the option's to set, so another value is a mistake, not a switch."""
    _check(config.name == kind, f"{group}.name", config.name,
           f"it names the {group} this option builds ({kind}); choose another with "
           f"{group}=<option>: {', '.join(options)}")  # fmt: skip


def _check_bounds(key: str, values: list[float], upper: float | None, example: str) -> None:
    """A [low, high] pair with 0 < low <= high (< upper)."""
    ok = len(values) == 2 and 0 < values[0] <= values[1] and (upper is None or values[1] < upper)
    below = f" < {upper}" if upper is not None else ""
    _check(
        ok, key, list(values), f"must be [low, high] with 0 < low <= high{below}, e.g. {example}"
    )


@dataclass
class DataConfig:
    name: str = MISSING  # which dataset (the option's file name)
    root: str = MISSING  # folder holding the dataset
    download: bool = True  # fetch through torchvision when missing
    system_dir: str | None = None  # offline copy installed by a system package
    batch_size: int = 128  # training images per optimizer step
    eval_batch_size: int = 1024  # images per forward pass when evaluating
    val_size: int = 5000  # training images held out for validation; 0 = validate on test
    limit_train: int | None = None  # use only the first N training images
    limit_test: int | None = None  # use only the first N validation and test images
    # DataLoader worker processes (image_folder only); null: one per CPU core this process
    # may use, less one for the trainer, between 2 and 16
    num_workers: int | None = None
    augment: bool = True  # random crop with padding (+ flip) on training batches
    crop_padding: int = 2  # zero padding per side before the random crop, pixels
    flip: bool = True  # random horizontal flips (off for digits)
    erase_prob: float = 0.0  # random erasing (cutout): chance per training image; 0 = off
    erase_scale: list[float] = field(default_factory=lambda: [0.02, 0.33])  # area fraction
    erase_ratio: list[float] = field(default_factory=lambda: [0.3, 3.3])  # box aspect ratio
    tta_flip: bool = False  # evaluate on each image and its mirror image (mean of logits)
    in_channels: int = 1
    num_classes: int | None = 10  # null = infer (image_folder)
    image_size: int = 28  # height = width, pixels
    mean: list[float] = field(default_factory=lambda: [0.5])  # per channel, for normalisation
    std: list[float] = field(default_factory=lambda: [0.5])
    num_train: int = 640  # synthetic only: training images generated
    num_test: int = 256  # synthetic only: test images generated

    def __post_init__(self) -> None:
        _check(self.batch_size >= 1, "data.batch_size", self.batch_size, "must be >= 1")
        _check(
            self.eval_batch_size >= 1, "data.eval_batch_size", self.eval_batch_size, "must be >= 1"
        )
        _check(self.val_size >= 0, "data.val_size", self.val_size, "must be >= 0 (0 = use test)")
        for key in ("limit_train", "limit_test"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"data.{key}", value, "must be null or >= 1")
        _check(self.num_workers is None or self.num_workers >= 0, "data.num_workers",
               self.num_workers, "must be null (sized from the CPU cores) or >= 0")  # fmt: skip
        _check(self.crop_padding >= 0, "data.crop_padding", self.crop_padding, "must be >= 0")
        _check(0 <= self.erase_prob <= 1, "data.erase_prob", self.erase_prob, "must be in [0, 1]")
        _check_bounds("data.erase_scale", self.erase_scale, upper=1.0, example="[0.02, 0.33]")
        _check_bounds("data.erase_ratio", self.erase_ratio, upper=None, example="[0.3, 3.3]")
        _check(self.in_channels in (1, 3), "data.in_channels", self.in_channels, "must be 1 or 3")
        _check(self.image_size >= 8, "data.image_size", self.image_size, "must be >= 8")
        _check(
            self.num_classes is None or self.num_classes >= 2,
            "data.num_classes",
            self.num_classes,
            "must be >= 2",
        )
        for key in ("mean", "std"):
            values = getattr(self, key)
            _check(
                len(values) == self.in_channels,
                f"data.{key}",
                list(values),
                f"needs one value per input channel ({self.in_channels})",
            )
        _check(all(s > 0 for s in self.std), "data.std", list(self.std), "must be > 0")


@dataclass
class ModelConfig:
    name: str = "small_cnn"
    width: int = 16  # channels of the first stage; stages use width, 2x, 4x (64 = tutorial)
    dropout: float = 0.0  # Dropout2d after the second block of each stage (tutorial: 0.3)
    head_dropout: float = 0.1  # Dropout before the last Linear (tutorial: 0.5)
    hidden: int = 512  # units of the head's hidden Linear layer
    batchnorm: bool = True  # false = conv bias instead of BatchNorm (ablations)
    depth: int = 2  # ConvBlocks per stage (the tutorial's 2)
    sync_batchnorm: bool = False  # several processes: BatchNorm statistics over the global batch

    def __post_init__(self) -> None:
        _check(self.width >= 1, "model.width", self.width, "must be >= 1")
        _check(self.hidden >= 1, "model.hidden", self.hidden, "must be >= 1")
        _check(self.depth >= 1, "model.depth", self.depth, "must be >= 1")
        for key in ("dropout", "head_dropout"):
            value = getattr(self, key)
            _check(0 <= value < 1, f"model.{key}", value, "must be in [0, 1)")


@dataclass
class OptimizerConfig:
    name: str = MISSING
    lr: float = MISSING  # peak learning rate
    weight_decay: float = 0.0  # L2 penalty (SGD) or decoupled decay (AdamW)
    decay_norm_and_bias: bool = False  # also decay BatchNorm weights and all biases

    def __post_init__(self) -> None:
        kind = type(self).__dataclass_fields__["name"].default
        _check_kind("optimizer", self, kind, OPTIMIZER_OPTIONS)
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class SGDConfig(OptimizerConfig):
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 <= self.momentum < 1, "optimizer.momentum", self.momentum, "must be in [0, 1)")
        _check(
            not self.nesterov or self.momentum > 0,
            "optimizer.nesterov",
            self.nesterov,
            "needs optimizer.momentum > 0",
        )


@dataclass
class AdamWConfig(OptimizerConfig):
    name: str = "adamw"
    lr: float = 3e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optimizer.betas",
            list(self.betas),
            "must be two values in [0, 1)",
        )
        _check(self.eps > 0, "optimizer.eps", self.eps, "must be > 0")


@dataclass
class SchedulerConfig:
    name: str = "none"  # the schedule this option builds; `none`: the learning rate stays

    def __post_init__(self) -> None:
        kind = type(self).__dataclass_fields__["name"].default
        _check_kind("scheduler", self, kind, SCHEDULER_OPTIONS)


@dataclass
class CosineConfig(SchedulerConfig):
    name: str = "cosine"
    interval: str = "step"  # step the schedule once per "step" or per "epoch" (tutorial)
    warmup_epochs: float = 0.3  # linear warmup before the cosine decay, in epochs
    eta_min: float = 0.0  # learning rate at the end of the decay

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("scheduler.interval", self.interval, ("epoch", "step"))
        _check(
            self.warmup_epochs >= 0, "scheduler.warmup_epochs", self.warmup_epochs, "must be >= 0"
        )
        _check(
            self.interval == "step" or float(self.warmup_epochs).is_integer(),
            "scheduler.warmup_epochs",
            self.warmup_epochs,
            "must be a whole number with scheduler.interval=epoch: add "
            "scheduler.warmup_epochs=0 (or 1), or use scheduler=tutorial_cosine",
        )
        _check(self.eta_min >= 0, "scheduler.eta_min", self.eta_min, "must be >= 0")


@dataclass
class PlateauConfig(SchedulerConfig):
    name: str = "plateau"
    factor: float = 0.5  # multiply the LR by this when validation accuracy stalls
    patience: int = 2  # epochs without improvement before reducing
    threshold: float = 0.05  # improvement that counts, in accuracy points (absolute)
    min_lr: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.factor < 1, "scheduler.factor", self.factor, "must be in (0, 1)")
        _check(self.patience >= 0, "scheduler.patience", self.patience, "must be >= 0")
        _check(self.threshold >= 0, "scheduler.threshold", self.threshold, "must be >= 0")
        _check(self.min_lr >= 0, "scheduler.min_lr", self.min_lr, "must be >= 0")


@dataclass
class StepConfig(SchedulerConfig):
    name: str = "step"
    step_size: int = 10  # epochs between reductions
    gamma: float = 0.1  # multiply the LR by this every step_size epochs

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.step_size >= 1, "scheduler.step_size", self.step_size, "must be >= 1")
        _check(0 < self.gamma <= 1, "scheduler.gamma", self.gamma, "must be in (0, 1]")


@dataclass
class OneCycleConfig(SchedulerConfig):
    name: str = "onecycle"
    pct_start: float = 0.25  # fraction of all steps spent raising the LR to optimizer.lr
    div_factor: float = 25.0  # start LR = optimizer.lr / div_factor
    final_div_factor: float = 1e4  # final LR = start LR / final_div_factor
    # OneCycleLR also cycles SGD's momentum (AdamW's first beta) against the LR by default,
    # overriding optimizer.momentum; here that is asked for, not implied.
    cycle_momentum: bool = False
    base_momentum: float = 0.85  # with cycle_momentum: momentum at the LR's peak
    max_momentum: float = 0.95  # with cycle_momentum: momentum at the start and the end

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0 < self.pct_start < 1, "scheduler.pct_start", self.pct_start, "must be in (0, 1)")
        _check(self.div_factor > 0, "scheduler.div_factor", self.div_factor, "must be > 0")
        _check(
            self.final_div_factor > 0,
            "scheduler.final_div_factor",
            self.final_div_factor,
            "must be > 0",
        )
        _check(
            0 <= self.base_momentum <= self.max_momentum < 1,
            "scheduler.base_momentum",
            self.base_momentum,
            f"must be in [0, scheduler.max_momentum={self.max_momentum}] and max_momentum < 1",
        )


@dataclass
class ClippingConfig:
    name: str = "none"  # norm | value | none
    max_norm: float | None = None  # norm: rescale gradients whose total L2 norm exceeds this
    max_value: float | None = None  # value: clamp every gradient element to +-max_value

    def __post_init__(self) -> None:
        _check_choice("clipping.name", self.name, ("norm", "value", "none"))
        if self.name == "norm":
            _check(
                self.max_norm is not None and self.max_norm > 0,
                "clipping.max_norm",
                self.max_norm,
                "must be > 0",
            )
        if self.name == "value":
            _check(
                self.max_value is not None and self.max_value > 0,
                "clipping.max_value",
                self.max_value,
                "must be > 0",
            )


@dataclass
class AmpConfig:
    name: str = "auto"  # auto | fp16 | bf16 | off

    def __post_init__(self) -> None:
        _check_choice("amp", self.name, ("auto", "fp16", "bf16", "off"))


@dataclass
class EmaConfig:
    name: str = "off"  # off | on
    decay: float = 0.999  # per optimizer step: the average spans about 1 / (1 - decay) steps
    warmup: bool = True  # decay rises as (1 + n) / (10 + n) until it reaches `decay`

    def __post_init__(self) -> None:
        _check_choice("ema", self.name, ("off", "on"))
        _check(0 < self.decay < 1, "ema.decay", self.decay, "must be in (0, 1), e.g. 0.999")


@dataclass
class TrainerConfig:
    epochs: int = 5
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False  # deterministic kernels: reproducible, sometimes slower
    log_every_n_steps: int = 50  # TensorBoard step scalars and progress-bar loss interval
    early_stopping_patience: int | None = None  # stop after N epochs without a better val acc
    label_smoothing: float = 0.1
    channels_last: bool | None = None  # null = where it is faster (CUDA, AVX-512 CPUs)
    tf32: bool = True  # CUDA (Ampere+): fp32 matmuls and convolutions on TF32 tensor cores
    progress_bar: bool = True  # shown only on a terminal
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    cuda_graph: bool = False  # capture the whole step in a CUDA graph (CUDA, bf16/fp32)
    num_threads: int | None = None  # CPU threads for torch; null = torch's default (one per core)
    resume: str | None = None  # null = fresh; auto; or a checkpoint file / run folder to continue
    on_nonfinite: str = "skip"  # NaN/Inf loss or gradient: skip the step, or stop (and save)
    max_consecutive_nonfinite: int = 10  # with skip: stop after this many skipped in a row
    devices: int = 1  # >1: start this many training processes here (DDP, one per GPU)

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        _check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "trainer.device",
            self.device,
            "use auto, cpu, cuda, cuda:N or mps",
        )
        _check(
            self.log_every_n_steps >= 1,
            "trainer.log_every_n_steps",
            self.log_every_n_steps,
            "must be >= 1",
        )
        _check(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            self.early_stopping_patience,
            "must be null or >= 1",
        )
        _check_choice("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        _check(
            self.max_consecutive_nonfinite >= 1,
            "trainer.max_consecutive_nonfinite",
            self.max_consecutive_nonfinite,
            "must be >= 1",
        )
        _check(self.devices >= 1, "trainer.devices", self.devices, "must be >= 1")
        _check(
            self.num_threads is None or self.num_threads >= 1,
            "trainer.num_threads",
            self.num_threads,
            "must be null or >= 1",
        )
        _check(
            0 <= self.label_smoothing < 1,
            "trainer.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )


@dataclass
class DiagnosticsConfig:
    loss_spike_factor: float = 2.0  # a step whose loss exceeds this x the running mean is a spike
    figures_every_n_epochs: int | None = 5  # histograms, image grid, confusion matrix; null: never

    def __post_init__(self) -> None:
        _check(
            self.loss_spike_factor > 1,
            "diagnostics.loss_spike_factor",
            self.loss_spike_factor,
            "must be > 1",
        )
        _check(
            self.figures_every_n_epochs is None or self.figures_every_n_epochs >= 1,
            "diagnostics.figures_every_n_epochs",
            self.figures_every_n_epochs,
            "must be null (never) or >= 1",
        )


SCHEMAS: dict[str, type] = {
    "schema_data": DataConfig,
    "schema_model": ModelConfig,
    "schema_sgd": SGDConfig,
    "schema_adamw": AdamWConfig,
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


# stable-cnn-eval's `data` before any data group is chosen: every data.* key, unset
# (MISSING), so that `data.root=...` alone changes the checkpoint's own data
# (conf/eval.yaml). A plain mapping of MISSING, so that a data group chosen on top
# merges into it whatever its types.
DATA_OVERRIDES = {f.name: MISSING for f in fields(DataConfig)}


def register_schemas() -> None:
    """Store every schema at the ConfigStore's root, where the YAML defaults find it."""
    store = ConfigStore.instance()
    for name, schema in SCHEMAS.items():
        store.store(name=name, node=schema)
    store.store(name="schema_data_overrides", node=DATA_OVERRIDES)
