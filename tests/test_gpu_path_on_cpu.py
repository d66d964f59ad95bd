"""The GPU path's own code, run on this CPU: fp16's GradScaler stepping optimizer=muon
(the real GradScaler, on CPU tensors); a CUDA graph's failed warm-up putting the CUDA
random state back (torch.cuda's streams and random state faked, tests/fake_gpu.py); and
every object tests/test_cuda.py builds, built by its own helpers on the CPU, so that the
GPU suite cannot go stale between GPU runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from stable_cnn.config import ClippingConfig, MuonConfig
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.training.captured_step import GraphedTrainStep
from stable_cnn.training.host_syncs import counting_host_waits, host_reads, waits_in_an_epoch
from stable_cnn.training.muon import MatrixMuon, MuonWithAuxiliary
from stable_cnn.training.optimizers import build_optimizer, muon_weights, start_momentum_at_zero
from stable_cnn.training.step import TrainStep, skips_on_device, unscale_clip_step
from tests.conftest import compose_run
from tests.test_cuda import (
    FailsItsWarmUp,
    ReadsTheHost,
    check_evaluation_on,
    command_lines,
    evaluation_checkpoint,
    global_batchnorm_pair,
    random_batches,
    train_eagerly_and_captured,
    trained_by,
)

CPU = torch.device("cpu")


def muon_run(auxiliary: str) -> tuple[nn.Module, MuonWithAuxiliary]:
    """A SmallCNN without dropout (two copies draw nothing) and optimizer=muon, fused."""
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=4, dropout=0.0, head_dropout=0.0, hidden=16)
    return model, build_optimizer(model, MuonConfig(auxiliary=auxiliary))


def unfused_twin(
    model: nn.Module, optimizer: MuonWithAuxiliary
) -> tuple[nn.Module, MuonWithAuxiliary]:
    """A copy of ``model`` and ``optimizer``'s settings for it, with torch's plain for-loop
    SGD or AdamW as the auxiliary: no kernel there that knows found_inf or grad_scale."""
    twin = copy.deepcopy(model)
    own = dict(twin.named_parameters())
    names = {p: name for name, p in model.named_parameters()}
    muon = MatrixMuon(muon_weights(twin, include_head=False), **optimizer.muon.defaults)
    groups = [
        {
            **group,
            "params": [own[names[p]] for p in group["params"]],
            "fused": None,
            "foreach": False,
        }
        for group in optimizer.auxiliary.param_groups
    ]
    auxiliary = type(optimizer.auxiliary)(groups)
    start_momentum_at_zero(auxiliary)
    return twin, MuonWithAuxiliary(muon, auxiliary)


def trained_tensors(model: nn.Module, optimizer: MuonWithAuxiliary) -> dict[str, torch.Tensor]:
    """Every parameter and every tensor of both parts' optimizer state, by name."""
    names = {p: name for name, p in model.named_parameters()}
    tensors = {name: p.detach().clone() for name, p in model.named_parameters()}
    for part in (optimizer.muon, optimizer.auxiliary):
        for p, state in part.state.items():
            tensors.update({f"{names[p]}.{k}": v.detach().clone() for k, v in state.items()})
    return tensors


def scaled_step(
    model: nn.Module, optimizer: MuonWithAuxiliary, scaler: torch.amp.GradScaler, unscaled_by: str
) -> int:
    """One fp16 step on the scaled gradients there, as the run's unscale_clip_step() takes it
    (unscale_, clip, GradScaler.step) or by GradScaler.step alone: its host reads."""
    with counting_host_waits() as counts:
        if unscaled_by == "update":
            parameters, finite = list(model.parameters()), torch.tensor(True)
            sync_free = skips_on_device(optimizer)
            unscale_clip_step(parameters, optimizer, scaler, ClippingConfig(), finite, sync_free)
        else:
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
    return host_reads(counts)


@pytest.mark.parametrize("auxiliary", ["sgd", "adamw"])
@pytest.mark.parametrize("unscaled_by", ["update", "step"])
def test_fp16s_scaler_steps_muon_on_the_device(auxiliary: str, unscaled_by: str):
    """optimizer=muon under fp16's GradScaler: GradScaler.step hands the verdict to the
    optimizer (found_inf, and grad_scale where step() itself unscales) instead of reading
    it on the host every step; a step with an Inf gradient (in one of Muon's weights)
    changes no weight and no optimizer state of either part, and the finite steps train
    as Muon with an unfused auxiliary does on the unscaled gradients."""
    model, optimizer = muon_run(auxiliary)
    twin, reference = unfused_twin(model, optimizer)
    assert not getattr(reference, "_step_supports_amp_scaling", False), "read on the host"
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(3, 8, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 10, (3, 8), generator=generator)
    reads = 0
    for index in range(3):
        scaler.scale(nn.functional.cross_entropy(model(images[index]), labels[index])).backward()
        if index == 1:  # an overflow in one weight's gradient: the whole step is skipped
            next(iter(optimizer.muon.matrices)).grad.view(-1)[0] = float("inf")
            before = trained_tensors(model, optimizer)
        reads += scaled_step(model, optimizer, scaler, unscaled_by)
        if index == 1:
            torch.testing.assert_close(trained_tensors(model, optimizer), before, rtol=0, atol=0)
            continue
        nn.functional.cross_entropy(twin(images[index]), labels[index]).backward()
        reference.step()
        reference.zero_grad(set_to_none=True)
    assert reads == 0, f"{reads} host reads in 3 steps: GradScaler read found_inf"
    assert scaler.get_scale() == 2.0**11, "the Inf step lowered the scale"
    # fused AdamW's kernel rounds in another order than the unfused one (by up to 5e-5 on
    # an AMD EPYC, not at all on a Xeon); a step skipped or taken twice differs far more
    tolerance = {"rtol": 1e-3, "atol": 1e-4} if auxiliary == "adamw" else {}
    torch.testing.assert_close(
        trained_tensors(model, optimizer), trained_tensors(twin, reference), **tolerance
    )


def test_every_command_line_of_the_gpu_suite_composes(tmp_path: Path):
    for line in command_lines("cpu", tmp_path / "images"):
        assert compose_run(line).trainer.device == "cpu", line


def test_the_gpu_suites_training_steps_train_on_the_cpu(fake_gpu, monkeypatch, caplog):
    """tests/test_cuda.py's eager and captured steps on the CPU, torch.cuda's streams
    faked: the captured step's warm-up fails (FailsItsWarmUp) and it trains eagerly, as
    the eager step does, skipping the NaN batch; the model that reads the host trains."""
    fake_gpu.install_streams(monkeypatch.setattr)
    batches = random_batches(4, 8, CPU)
    batches[2][0][0, 0, 0, 0] = float("nan")
    trained = train_eagerly_and_captured(batches, "off", dropout=0.0, wrap=FailsItsWarmUp)
    for _, stats in trained.values():
        assert stats.nonfinite_steps == 1 and stats.images == 3 * 8
    assert "capture failed" in caplog.text
    _, stats = trained_by(TrainStep, batches, "off", 0.2, wrap=ReadsTheHost)
    assert stats.nonfinite_steps == 1


class MovesTheGeneratorThenFails(FailsItsWarmUp):
    """FailsItsWarmUp that reseeds the CUDA generator at every forward pass: what its
    dropout's draws do on a GPU, made visible in the fake's random state."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        torch.cuda.manual_seed(99)
        return super().forward(images)


def test_a_warm_up_that_raises_puts_the_gpus_random_state_back(fake_gpu, monkeypatch, caplog):
    """The captured step's warm-up fails at its second step, after the first moved the
    CUDA generator (to seed 99): the state read before the warm-up is set back, and the
    step trains on eagerly. torch.cuda's streams and random state are the fake's (two
    GPUs, the second current); the step's tensors live on the CPU."""
    fake_gpu.install_streams(monkeypatch.setattr)
    fake_gpu.count, fake_gpu.current = 2, 1
    trained_by(
        GraphedTrainStep, random_batches(2, 8, CPU), "off", 0.0, wrap=MovesTheGeneratorThenFails
    )
    assert "capture failed (this model fails at its second step" in caplog.text
    assert list(fake_gpu.restored) == [1], "the current GPU's generator put back, once"
    seed, device = fake_gpu.restored[1][:2].tolist()
    assert (seed, device) == (0, 1), "GPU 1's state before the warm-up (trained_by seeds 0)"


def test_the_gpu_suites_global_batchnorm_on_the_cpu(tmp_path: Path, monkeypatch):
    """test_cuda.py's GlobalBatchNorm pair in a one-process gloo group told it has two
    members: the global path computes what BatchNorm does, forward and backward."""
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        plain, model, images = global_batchnorm_pair(CPU)
        monkeypatch.setattr(dist, "get_world_size", lambda *args, **kwargs: 2)
        torch.testing.assert_close(model(images), plain(images), atol=1e-4, rtol=1e-4)
        model(images).sum().backward()
    finally:
        monkeypatch.undo()  # the group's own teardown asks its real size
        dist.destroy_process_group()


def test_the_gpu_suites_evaluation_checkpoint_on_the_cpu(tmp_path: Path):
    check_evaluation_on("cpu", evaluation_checkpoint(tmp_path))


@pytest.mark.parametrize("path", ["eager", "graphed"])
def test_the_gpu_suites_host_wait_count_on_the_cpu(path: str):
    """step_waits' epoch, 2 steps long, builds and runs (the graphed path falls back off
    CUDA); what its counts must be is tests/test_host_reads.py's question."""
    _, syncs = waits_in_an_epoch(path, "off", 2, CPU)
    assert syncs == 0, "CUDA's own count: none off CUDA"
