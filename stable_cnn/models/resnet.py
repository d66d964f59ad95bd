"""torchvision's ResNets for any input channels and classes; for small images (up to 64
px) the 7x7 stride-2 stem and the max-pool become one 3x3 stride-1 convolution."""

from __future__ import annotations

import torch
from torch import nn

from stable_cnn.errors import ConfigError

SMALL_INPUT_UP_TO = 64  # pixels: below this the ImageNet stem would shrink images to nothing


def resnet(
    arch: str,
    in_channels: int,
    num_classes: int,
    image_size: int,
    small_input: bool | None = None,
    weights: str | None = None,
) -> nn.Module:
    """``arch`` (resnet18/34/50) with ``in_channels`` inputs and ``num_classes`` outputs;
    ``weights`` (e.g. DEFAULT) are torchvision's, downloaded where there is internet."""
    import torchvision.models as tv

    small = image_size <= SMALL_INPUT_UP_TO if small_input is None else small_input
    try:
        model = getattr(tv, arch)(weights=weights)
    except Exception as err:  # no internet, an unknown weights name: torch raises many kinds
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ConfigError(
            f"model.weights={weights}: torchvision could not load {arch}'s weights ({reason}): "
            f"run once with internet access (they are cached in $TORCH_HOME), or use "
            f"model.weights=null for a random init"
        ) from None
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = adapt_channels(model.conv1, in_channels)
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def adapt_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """The same convolution for ``in_channels`` inputs: pretrained RGB filters summed into
    one greyscale filter (or repeated), so that a pretrained stem keeps what it learned."""
    adapted = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        bias=conv.bias is not None,
    )
    with torch.no_grad():
        summed = conv.weight.sum(dim=1, keepdim=True)  # (out, 1, k, k)
        adapted.weight.copy_(summed.repeat(1, in_channels, 1, 1) / in_channels)
    return adapted
