"""The SmallCNN is the tutorial's architecture, initialised as the tutorial intended."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from stable_cnn.models.small_cnn import SmallCNN


class TutorialConvBlock(nn.Module):
    """The tutorial's ConvBlock, verbatim."""

    def __init__(self, in_channels, out_channels, dropout_rate=0.0):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(p=dropout_rate) if dropout_rate > 0 else nn.Identity()


def tutorial_small_cnn(num_classes: int = 10, dropout_rate: float = 0.3) -> nn.Module:
    """The tutorial's SmallCNN layers, verbatim (it had no forward)."""
    model = nn.Module()
    model.stage1 = nn.Sequential(
        TutorialConvBlock(3, 64),
        TutorialConvBlock(64, 64, dropout_rate=dropout_rate),
        nn.MaxPool2d(2, 2),
    )
    model.stage2 = nn.Sequential(
        TutorialConvBlock(64, 128),
        TutorialConvBlock(128, 128, dropout_rate=dropout_rate),
        nn.MaxPool2d(2, 2),
    )
    model.stage3 = nn.Sequential(
        TutorialConvBlock(128, 256),
        TutorialConvBlock(256, 256, dropout_rate=dropout_rate),
        nn.MaxPool2d(2, 2),
    )
    model.classifier = nn.Sequential(
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(),
        nn.Linear(256, 512),
        nn.ReLU(),
        nn.Dropout(p=0.5),
        nn.Linear(512, num_classes),
    )
    return model


def layer_signature(model: nn.Module) -> list[tuple]:
    """Leaf layers in order, with what defines them (Identity placeholders left out)."""
    signature = []
    for module in model.modules():
        if list(module.children()) or isinstance(module, nn.Identity):
            continue
        params = tuple(tuple(p.shape) for p in module.parameters(recurse=False))
        rate = getattr(module, "p", None)
        signature.append((type(module).__name__, params, rate))
    return signature


def test_width_64_matches_the_tutorial_layer_for_layer():
    ours = SmallCNN(in_channels=3, num_classes=10, width=64)
    assert layer_signature(ours) == layer_signature(tutorial_small_cnn())


def test_width_64_parameter_count_is_the_tutorials():
    # Counted by hand from the tutorial: convs 3*64*9 + 64*64*9 + 64*128*9 + 128*128*9
    # + 128*256*9 + 256*256*9, BN 2*(64+64+128+128+256+256), Linear 256*512+512, 512*10+10.
    model = SmallCNN(in_channels=3, num_classes=10, width=64)
    assert sum(p.numel() for p in model.parameters()) == 1_283_018


def test_convs_have_no_bias_and_batchnorm_false_puts_it_back():
    with_bn = SmallCNN(width=8)
    convs = [m for m in with_bn.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 6 and all(conv.bias is None for conv in convs)
    without_bn = SmallCNN(width=8, batchnorm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in without_bn.modules())
    assert all(m.bias is not None for m in without_bn.modules() if isinstance(m, nn.Conv2d))


def test_init_is_kaiming_fan_out_and_batchnorm_identity():
    torch.manual_seed(0)
    model = SmallCNN(width=64)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            fan_out = module.out_channels * 3 * 3
            expected_std = math.sqrt(2.0 / fan_out)
            # PyTorch's default conv init would give std 1/sqrt(3 * fan_in): far off.
            assert module.weight.std().item() == pytest.approx(expected_std, rel=0.1)
            assert module.weight.mean().abs().item() < 0.1 * expected_std
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 32), (3, 64)])
def test_forward_gives_logits_for_any_input_size(channels: int, size: int):
    model = SmallCNN(in_channels=channels, num_classes=7, width=8).eval()
    logits = model(torch.randn(4, channels, size, size))
    assert logits.shape == (4, 7)
    assert torch.isfinite(logits).all()


def test_dropout_rates_are_configurable_and_off_in_eval():
    model = SmallCNN(width=8, dropout=0.2, head_dropout=0.4)
    rates = [m.p for m in model.modules() if isinstance(m, nn.Dropout2d | nn.Dropout)]
    assert rates == [0.2, 0.2, 0.2, 0.4]
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("depth", [1, 3, 4])
def test_depth_sets_the_blocks_per_stage_with_dropout_after_the_last(depth: int):
    model = SmallCNN(in_channels=1, width=8, depth=depth, dropout=0.2).eval()
    for stage in (model.stage1, model.stage2, model.stage3):
        blocks = [m for m in stage if isinstance(m, nn.Sequential)]
        assert len(blocks) == depth and isinstance(stage[-1], nn.MaxPool2d)
        rates = [getattr(block[-1], "p", 0.0) for block in blocks]
        assert rates == [0.0] * (depth - 1) + [0.2]
    assert len([m for m in model.modules() if isinstance(m, nn.Conv2d)]) == 3 * depth
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
