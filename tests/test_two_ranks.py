"""Two processes in a real gloo process group, on the CPU, for the pieces of the step that
are collectives: the global BatchNorm and the agreement on skipped steps. Each test
spawns its two ranks once and checks everything it needs inside them (a failed assert
in either fails the test, with the rank's traceback)."""

from __future__ import annotations

import copy
import functools
import itertools
import os
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from stable_cnn.config import ClippingConfig, SGDConfig
from stable_cnn.models.global_batchnorm import GlobalBatchNorm
from stable_cnn.state.progress import EpochProgress
from stable_cnn.system.hardware import FP32, Runtime
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.step import TrainStep

pytestmark = pytest.mark.slow  # each test starts two processes (a few seconds)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def in_two_ranks(body: Callable[[int], None]) -> None:
    """Run ``body(rank)`` in two processes joined in a gloo group."""
    mp.spawn(_join_and_run, args=(body, free_port()), nprocs=2, join=True)


def _join_and_run(rank: int, body: Callable[[int], None], port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    body(rank)  # an assertion that fails here reaches mp.spawn, which fails the test
    dist.barrier()  # neither leaves while the other still talks to it
    dist.destroy_process_group()
    # Exit at once, skipping the interpreter's teardown: under pytest, about one spawned
    # child in ten aborted there ("terminate called without an active exception") after
    # everything above had passed; never seen outside pytest or in the CLI's own runs.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# The namespaces of torch's collective ops: every collective dispatches one of them, be it
# torch.distributed's functions, the functional collectives, or DDP's reducer (C++).
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "c10d_functional")


class _RecordCollectives(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace in COLLECTIVE_NAMESPACES:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@contextmanager
def counting_collectives() -> Iterator[list[str]]:
    """The ops of every collective the body's thread issues (the backward it runs
    included), in order, from Python or C++, on any process group."""
    seen: list[str] = []
    with _RecordCollectives(seen):
        yield seen


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm subclass, as libraries define them (converted like torch's own)."""


def batchnorm_act(channels: int, momentum: float | None) -> nn.Module:
    """timm's BatchNorm with its activation applied in its own forward (EfficientNet's,
    RegNet's): the conversion must keep the activation."""
    from timm.layers import BatchNormAct2d

    return BatchNormAct2d(channels, momentum=momentum, act_layer=nn.SiLU)


def global_batchnorm_matches_one_process_with_the_whole_batch(rank: int) -> None:
    generator = torch.Generator().manual_seed(0)
    whole = torch.randn(8, 3, 5, 5, generator=generator) * 2 + 1
    mine = whole[rank * 4 : (rank + 1) * 4]
    # a loss of the outputs that BatchNorm does not normalise away (a sum of squares
    # would be nearly constant, its gradients rounding noise)
    probe = torch.randn(8, 3, 5, 5, generator=generator)
    momenta = (0.1, None)  # None: the cumulative average of every batch
    for layer, momentum in itertools.product((ScaledBatchNorm2d, batchnorm_act), momenta):
        torch.manual_seed(1)
        reference = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), layer(3, momentum=momentum))
        torch.manual_seed(1)
        local = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), layer(3, momentum=momentum))
        converted = GlobalBatchNorm.convert(local)
        assert isinstance(converted[1], GlobalBatchNorm), "subclasses are converted too"
        assert converted[1].weight is local[1].weight, "the parameters are shared, not copied"
        for step in range(3):
            batch_scale = 1.0 + step  # statistics that change between steps
            expected = reference(whole * batch_scale)
            (expected * probe).sum().backward()
            got = converted(mine * batch_scale)
            (got * probe[rank * 4 : (rank + 1) * 4]).sum().backward()
            torch.testing.assert_close(got, expected[rank * 4 : (rank + 1) * 4])
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(converted.state_dict()[name], value, msg=name)
        for theirs, ours in zip(reference.parameters(), converted.parameters(), strict=True):
            dist.all_reduce(ours.grad)  # DDP's sum of the two processes' gradients
            torch.testing.assert_close(ours.grad, theirs.grad)
    sequence = torch.randn(4, 3, 7, generator=generator)  # (N, C, L): BatchNorm1d's input
    converted = GlobalBatchNorm.convert(nn.BatchNorm1d(3))
    assert converted(sequence).shape == sequence.shape


def test_global_batchnorm_matches_one_process_with_the_whole_batch():
    """Outputs, gradients and running statistics (momentum and the cumulative
    average) of two processes with half the batch each equal one process's with the
    whole batch, for BatchNorm subclasses (timm's with its activation too) and inputs of
    any rank."""
    pytest.importorskip("timm")
    in_two_ranks(global_batchnorm_matches_one_process_with_the_whole_batch)


class InfOnRankOne(nn.Module):
    """Cross-entropy, plus Inf on rank 1 at its second call: a loss whose value is
    non-finite while its gradients are finite (as an overflowed logit under label
    smoothing gives), the case the gradients alone would not reveal."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank, self.calls = rank, 0

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        loss = nn.functional.cross_entropy(logits, labels)
        if self.rank == 1 and self.calls == 2:
            loss = loss + float("inf")
        return loss


def a_bad_loss_on_one_rank_skips_the_step_on_both(rank: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    network = nn.parallel.DistributedDataParallel(model)
    # DDP alone, forward and backward: the collectives that are DDP's, not the step's
    ddp_alone = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
    optimizer = build_optimizer(model, SGDConfig(lr=0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    runtime = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)
    clipping = ClippingConfig("norm", max_norm=1.0)
    step = TrainStep(network, InfOnRankOne(rank), optimizer, scaler, clipping, runtime)
    generator = torch.Generator().manual_seed(rank)
    batches = []
    for _ in range(3):
        images = torch.randn(5, 3, 2, 2, generator=generator)
        batches.append((images, torch.randint(0, 4, (5,), generator=generator)))
    with counting_collectives() as ddp_own:
        criterion = InfOnRankOne(rank)
        for images, labels in batches:
            criterion(ddp_alone(images), labels).backward()
    assert ddp_own, "the count sees DDP's own all-reduce, issued from C++"
    weights, applied = [], []
    with counting_collectives() as collectives:
        for images, labels in batches:
            outcome = step.run([(images, labels)], EpochProgress.start(runtime.device))
            applied.append(bool(outcome.applied))
            weights.append(model[1].weight.detach().clone())
    assert applied == [True, False, True], f"rank {rank}: {applied}"
    assert torch.equal(weights[1], weights[0]), "the skipped step left the weights alone"
    both = [torch.empty_like(weights[2]) for _ in range(2)]
    dist.all_gather(both, weights[2])
    assert torch.equal(both[0], both[1]), "the two processes hold the same model"
    assert collectives == ddp_own, "no collective of the step's own: DDP's average decides"


def test_a_bad_loss_on_one_rank_skips_the_step_on_both():
    in_two_ranks(a_bad_loss_on_one_rank_skips_the_step_on_both)


def one_build_of_the_disk_cache(folder: Path, rank: int) -> None:
    """Both processes of a machine build their data with data.cache=disk: the first
    decodes each folder into the cache, the second reads it and decodes nothing."""
    from stable_cnn.data import image_folder
    from stable_cnn.system.distributed import World
    from stable_cnn.training.build import build_data
    from tests.conftest import compose_run

    decoded: list[int] = []
    decode = image_folder.decode_files

    def counted(subset, config):  # what this process decoded itself
        decoded.append(len(subset))
        return decode(subset, config)

    image_folder.decode_files = counted
    world = World(rank=rank, size=2, local_rank=rank, local_size=2, launcher="torchrun")
    run = compose_run(
        ["data=image_folder", f"data.root={folder}", "data.cache=disk", "data.batch_size=2"]
    )
    data = build_data(run, world, Runtime(torch.device("cpu"), FP32, torch.contiguous_format))
    every = [None, None]
    dist.all_gather_object(every, sum(decoded))
    assert every == [12 + 5, 0], f"images decoded by each process: {every}"
    assert len(data.train) == 3  # 12 images, batches of 2, half each


def test_two_processes_build_one_disk_cache(tmp_path: Path):
    from tests.test_data import write_image_folder

    write_image_folder(tmp_path, {"train": {"cat": 6, "dog": 6}, "val": {"cat": 2, "dog": 3}})
    in_two_ranks(functools.partial(one_build_of_the_disk_cache, tmp_path))
