"""The model group (conf/model/): the SmallCNN (the default), torchvision's ResNets, any timm
model, or a model class of your own (``model._target_``). What the data decides (input
channels, classes, image size) is not here: the run gives it to every model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from stable_cnn.config.checks import check, check_choice

RESNETS = ("resnet18", "resnet34", "resnet50")


@dataclass
class ModelConfig:
    """What every model option has."""

    name: str = MISSING  # the option (small_cnn, resnet, custom); timm: the timm model's name
    sync_batchnorm: bool = False  # several processes: BatchNorm statistics over the global batch


@dataclass
class SmallCNNConfig(ModelConfig):
    name: str = "small_cnn"
    width: int = 16  # channels of the first stage; stages use width, 2x, 4x (64 = tutorial)
    dropout: float = 0.0  # Dropout2d after the second block of each stage (tutorial: 0.3)
    head_dropout: float = 0.1  # Dropout before the last Linear (tutorial: 0.5)
    hidden: int = 512  # units of the head's hidden Linear layer
    batchnorm: bool = True  # false = conv bias instead of BatchNorm (ablations)
    depth: int = 2  # ConvBlocks per stage (the tutorial's 2)

    def __post_init__(self) -> None:
        check(self.width >= 1, "model.width", self.width, "must be >= 1")
        check(self.hidden >= 1, "model.hidden", self.hidden, "must be >= 1")
        check(self.depth >= 1, "model.depth", self.depth, "must be >= 1")
        for key in ("dropout", "head_dropout"):
            value = getattr(self, key)
            check(0 <= value < 1, f"model.{key}", value, "must be in [0, 1)")


@dataclass
class ResNetConfig(ModelConfig):
    name: str = "resnet"
    arch: str = "resnet18"  # torchvision's resnet18, resnet34 or resnet50
    # 3x3 stride-1 stem, no max-pool (the usual CIFAR adaptation); null: for images up to 64 px
    small_input: bool | None = None
    weights: str | None = None  # null: random init; DEFAULT: torchvision's ImageNet weights

    def __post_init__(self) -> None:
        check_choice("model.arch", self.arch, RESNETS)


@dataclass
class TimmConfig(ModelConfig):
    name: str = "resnet10t"  # any model timm.create_model knows (timm.list_models())
    pretrained: bool = False  # timm's pretrained weights (downloaded where there is internet)
    # +model.KEY=VALUE: passed on to timm.create_model (e.g. +model.drop_rate=0.1)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class CustomModelConfig(ModelConfig):
    name: str = "custom"
    # PACKAGE.MODULE.CALLABLE, called with in_channels, num_classes and image_size (and the
    # +model.KEY=VALUE keys); returns an nn.Module mapping (N, C, H, W) images to logits
    _target_: str = MISSING
    kwargs: dict[str, Any] = field(default_factory=dict)  # filled from +model.KEY=VALUE

    def __post_init__(self) -> None:
        check(
            "." in self._target_,
            "model._target_",
            self._target_,
            "must be PACKAGE.MODULE.CALLABLE, importable where the run starts",
        )
