"""The model group (conf/model/): the SmallCNN's size and regularisation."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check


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
        check(self.width >= 1, "model.width", self.width, "must be >= 1")
        check(self.hidden >= 1, "model.hidden", self.hidden, "must be >= 1")
        check(self.depth >= 1, "model.depth", self.depth, "must be >= 1")
        for key in ("dropout", "head_dropout"):
            value = getattr(self, key)
            check(0 <= value < 1, f"model.{key}", value, "must be in [0, 1)")
