"""The tutorial's SmallCNN, with its bugs fixed: it has a forward, and its init runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ConvBlock(nn.Sequential):
    """3x3 conv -> BatchNorm -> ReLU, then Dropout2d when dropout > 0.

    The conv has no bias when BatchNorm follows (BN's own shift makes it redundant);
    ``batchnorm=False`` drops BN and puts the bias back, for ablations.
    """

    def __init__(
        self, in_channels: int, out_channels: int, dropout: float = 0.0, batchnorm: bool = True
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=not batchnorm),
            nn.BatchNorm2d(out_channels) if batchnorm else nn.Identity(),
            nn.ReLU(inplace=True),
            nn.Dropout2d(p=dropout) if dropout > 0 else nn.Identity(),
        )


def conv_stage(
    in_channels: int, out_channels: int, dropout: float, batchnorm: bool, depth: int = 2
) -> nn.Sequential:
    """``depth`` ConvBlocks (the tutorial's 2; Dropout2d after the last only), then halve
    the resolution. Module indices match the tutorial's at depth 2, so checkpoints load."""
    channels = [in_channels] + [out_channels] * depth
    blocks = [
        ConvBlock(channels[i], channels[i + 1], dropout if i == depth - 1 else 0.0, batchnorm)
        for i in range(depth)
    ]
    return nn.Sequential(*blocks, nn.MaxPool2d(2, 2))


class SmallCNN(nn.Module):
    """Three conv stages (width, 2*width, 4*width channels; ``depth`` ConvBlocks each, the
    tutorial's 2) and a dropout-regularised head.

    Any input size of at least 8x8 works: AdaptiveAvgPool removes the spatial size.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        dropout: float = 0.3,
        head_dropout: float = 0.5,
        hidden: int = 512,
        batchnorm: bool = True,
        depth: int = 2,
    ) -> None:
        super().__init__()
        self.stage1 = conv_stage(in_channels, width, dropout, batchnorm, depth)
        self.stage2 = conv_stage(width, 2 * width, dropout, batchnorm, depth)
        self.stage3 = conv_stage(2 * width, 4 * width, dropout, batchnorm, depth)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d((1, 1)),
            nn.Flatten(),
            nn.Linear(4 * width, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(p=head_dropout),
            nn.Linear(hidden, num_classes),
        )
        self._initialize_weights()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SmallCNN:
        """The model a checkpoint's ``model_config`` describes (what names the kind and the
        image size, which any size fits, aside)."""
        return cls(
            **{
                key: value
                for key, value in config.items()
                if key not in ("name", "kind", "image_size")
            }
        )

    def _initialize_weights(self) -> None:
        # Kaiming (fan_out) suits ReLU convs; BN starts as the identity. Linear layers
        # keep PyTorch's default init, as in the tutorial.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stage1(images)  # (N, width, H/2, W/2)
        x = self.stage2(x)  # (N, 2*width, H/4, W/4)
        x = self.stage3(x)  # (N, 4*width, H/8, W/8)
        return self.classifier(x)  # (N, num_classes) logits
