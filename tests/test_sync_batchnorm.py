"""model.sync_batchnorm=true's conversion on real models, in a one-rank gloo group: the
converted model computes what the original did, BatchNorm subclasses that do more than
normalise keep doing it or are refused, and evaluation issues no collective."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from stable_cnn.errors import ConfigError
from stable_cnn.models.global_batchnorm import GlobalBatchNorm
from tests.test_two_ranks import counting_collectives


@pytest.fixture
def one_rank_group(tmp_path: Path) -> Iterator[None]:
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=[False, True], ids=["alone", "as_one_of_several"])
def as_one_of_several(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Also run the layers' path for several processes: the group reads as two processes
    wide, and the all-reduce over its one process is the identity."""
    if request.param:
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    return request.param


def timm_mobilenet() -> nn.Module:
    timm = pytest.importorskip("timm")
    return timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)


def torchvision_resnet() -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(num_classes=10)


@pytest.mark.parametrize("build", [timm_mobilenet, torchvision_resnet])
def test_the_converted_model_computes_what_the_original_did(
    build, one_rank_group: None, as_one_of_several: bool
):
    """timm's BatchNormAct2d keeps the activation it applies after normalising, and
    outputs and running statistics match the original's in training and in evaluation."""
    torch.manual_seed(0)
    original = build()
    converted = GlobalBatchNorm.convert(copy.deepcopy(original))
    norms = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, GlobalBatchNorm) for m in norms)
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    for training in (True, False):
        original.train(training)
        converted.train(training)
        with counting_collectives() as collectives:
            got = converted(images)
        torch.testing.assert_close(got, original(images), msg=f"{training=}")
        assert bool(collectives) == (training and as_one_of_several), collectives
    for name, value in original.state_dict().items():
        torch.testing.assert_close(converted.state_dict()[name], value, msg=name)


class ClampedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass with a forward of its own that the conversion cannot know."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(images).clamp(max=1.0)


class RenamedBatchNorm2d(nn.BatchNorm2d):
    """A subclass that only renames: BatchNorm's forward, converted like BatchNorm."""


def test_a_batchnorm_with_an_unknown_forward_is_refused_in_one_line():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), RenamedBatchNorm2d(4), ClampedBatchNorm2d(4))
    with pytest.raises(ConfigError) as refusal:
        GlobalBatchNorm.convert(model)
    message = str(refusal.value)
    assert "\n" not in message
    assert "'2'" in message and "ClampedBatchNorm2d" in message, message
    assert "model.sync_batchnorm=false" in message, message


def test_evaluation_without_running_statistics_issues_no_collective(
    one_rank_group: None, monkeypatch: pytest.MonkeyPatch
):
    """Ranks may evaluate different numbers of batches: a collective there would hang. As
    torch's SyncBatchNorm does, evaluation normalises each process's batch on its own."""
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # the path for several
    layer = GlobalBatchNorm.convert(nn.BatchNorm2d(3, track_running_stats=False))
    images = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    with counting_collectives() as collectives:
        layer.train()
        layer(images)
    assert collectives, "training gathers the statistics of every process"
    with counting_collectives() as collectives:
        layer.eval()
        got = layer(images)
    assert collectives == [], "evaluation issues no collective"
    torch.testing.assert_close(got, nn.functional.batch_norm(images, None, None, training=True))
