"""The speedrun's recipe tools: optimizer=muon, mixup and cutmix, translate test-time
augmentation. Each is checked against its definition here; the CLI's exact resume of a
run that uses all three is in test_lr_find.py (one run serves both)."""

from __future__ import annotations

import copy
import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from stable_cnn.config import ClippingConfig, LRFindConfig, MuonConfig, OneCycleConfig
from stable_cnn.data.augment import BatchMixing, shifted
from stable_cnn.data.augment import TestTimeAugmentation as TTA  # pytest collects Test*
from stable_cnn.data.build import batch_mixing
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import FP32, Precision, Runtime
from stable_cnn.training.captured_step import build_train_step
from stable_cnn.training.lr_finder import sweep
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep, optimizer_step
from tests.conftest import REPO, TINY, compose_config, compose_run

CPU = Runtime(torch.device("cpu"), FP32, torch.channels_last)
NO_CLIPPING = ClippingConfig(name="none")


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN(in_channels=1, num_classes=10, width=4).to(memory_format=torch.channels_last)


def loss_of(model: nn.Module, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)  # the dropout masks
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(16, 1, 28, 28, generator=generator).to(memory_format=torch.channels_last)
    labels = torch.randint(10, (16,), generator=generator)
    return nn.functional.cross_entropy(model(images), labels)


# --- optimizer=muon ------------------------------------------------------------------


def test_muon_steps_each_filter_bank_as_torch_muon_steps_its_matrix():
    """A 3x3 convolution's filters (stored channels_last) move exactly as
    torch.optim.Muon moves the same weights given as a plain (out, in x 9) matrix."""
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig(lr=0.05, weight_decay=0.1))
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    matrix = nn.Parameter(conv.weight.detach().contiguous().view(conv.out_channels, -1).clone())
    reference = torch.optim.Muon([matrix], lr=0.05, weight_decay=0.1, momentum=0.9)
    for seed in (1, 2):  # the second step uses the momentum
        loss_of(model, seed).backward()
        matrix.grad = conv.weight.grad.contiguous().view(conv.out_channels, -1).clone()
        optimizer.step()
        reference.step()
        optimizer.zero_grad()
    moved = conv.weight.detach().contiguous().view(conv.out_channels, -1)
    assert torch.allclose(moved, matrix.detach(), atol=1e-6)


@pytest.mark.parametrize("muon_head", [False, True])
def test_muon_trains_hidden_weights_and_leaves_the_rest_to_its_auxiliary(muon_head: bool):
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig(muon_head=muon_head, auxiliary="adamw"))
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].weight
    by_muon = set(optimizer.muon.param_groups[0]["params"])
    matrices = {p for p in model.parameters() if p.ndim >= 2}
    assert by_muon == (matrices if muon_head else matrices - {head})
    auxiliary = optimizer.auxiliary
    assert isinstance(auxiliary, torch.optim.AdamW) and auxiliary.param_groups[0]["fused"]
    decayed = [p for g in auxiliary.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert decayed == ([] if muon_head else [head]), "BatchNorm weights and biases: no decay"
    assert len(optimizer.param_groups) == 1 + len(auxiliary.param_groups)


def test_muon_judges_steps_on_the_device_only_beside_a_fused_auxiliary(
    monkeypatch: pytest.MonkeyPatch,
):
    """On MPS the auxiliary SGD is not fused and cannot take found_inf: the step is then
    judged on the host, and trains (with auxiliary_momentum=0 too: plain SGD, no
    Nesterov). Fakes only the list of devices with fused kernels, to take MPS's path."""
    from stable_cnn.training import optimizers
    from stable_cnn.training.step import skips_on_device

    assert skips_on_device(build_optimizer(small_model(), MuonConfig()))
    monkeypatch.setattr(optimizers, "FUSED_DEVICES", ())  # as on MPS
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig(auxiliary_momentum=0.0))
    assert not skips_on_device(optimizer)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.detach().clone() for p in model.parameters()]
    assert optimizer_step(
        loss_of(model), list(model.parameters()), optimizer, scaler, NO_CLIPPING
    ).applied
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_muon_alone_when_every_parameter_is_a_matrix():
    """A model without biases or BatchNorm, its classifier given to Muon too: no
    auxiliary at all, and it still steps, skips and saves."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 26 * 26, 10, bias=False),
    )
    optimizer = build_optimizer(model, MuonConfig(muon_head=True))
    assert optimizer.auxiliary is None and len(optimizer.param_groups) == 1
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    images, labels = torch.randn(4, 1, 28, 28), torch.randint(10, (4,))
    loss = nn.functional.cross_entropy(model(images), labels)
    before = [p.detach().clone() for p in model.parameters()]
    assert not optimizer_step(
        loss * float("nan"), list(model.parameters()), optimizer, scaler, NO_CLIPPING
    ).applied
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    loss = nn.functional.cross_entropy(model(images), labels)
    assert optimizer_step(loss, list(model.parameters()), optimizer, scaler, NO_CLIPPING).applied
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))


def test_a_nonfinite_muon_step_changes_nothing_and_the_next_one_trains():
    """The step is judged on the device (found_inf), as with a fused SGD: a NaN loss
    leaves every weight and momentum as it was, without the host reading a flag."""
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig())
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    parameters = list(model.parameters())
    before = [p.detach().clone() for p in parameters]
    momentum = [optimizer.muon.state[p]["momentum_buffer"].clone() for p in by_muon(optimizer)]
    step = optimizer_step(loss_of(model) * float("nan"), parameters, optimizer, scaler, NO_CLIPPING)
    assert not step.applied
    assert all(torch.equal(a, b) for a, b in zip(before, parameters, strict=True))
    assert all(
        torch.equal(optimizer.muon.state[p]["momentum_buffer"], m)
        for p, m in zip(by_muon(optimizer), momentum, strict=True)
    )
    assert optimizer_step(loss_of(model), parameters, optimizer, scaler, NO_CLIPPING).applied
    assert all(not torch.equal(a, b) for a, b in zip(before, parameters, strict=True))


def by_muon(optimizer) -> list[nn.Parameter]:
    return optimizer.muon.param_groups[0]["params"]


def test_muon_state_loads_into_a_new_optimizer_and_a_schedule_moves_both_rates():
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig(lr=0.05, auxiliary_lr=0.2))
    loss_of(model).backward()
    optimizer.step()
    optimizer.zero_grad()
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it: no shared buffers

    twin = small_model()
    twin.load_state_dict(model.state_dict())
    reloaded = build_optimizer(twin, MuonConfig(lr=0.05, auxiliary_lr=0.2))
    reloaded.load_state_dict(saved)
    for each in (optimizer, reloaded):  # halves every group's rate, where its step reads it
        torch.optim.lr_scheduler.LambdaLR(each, lambda step: 0.5)
    assert reloaded.muon.param_groups[0]["lr"] == pytest.approx(0.025)
    assert reloaded.auxiliary.param_groups[0]["lr"] == pytest.approx(0.1)
    assert [g["lr"] for g in reloaded.param_groups] == pytest.approx([0.025, 0.1, 0.1])

    for trained in (model, twin):
        loss_of(trained, seed=3).backward()
    optimizer.step()
    reloaded.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a, b), "the momentum came back with the state"


def test_a_cycled_momentum_moves_muons_momentum_and_leaves_an_auxiliary_adamws_betas():
    """scheduler=onecycle with cycle_momentum under optimizer=muon auxiliary=adamw: Muon's
    momentum cycles, as torch's OneCycleLR did (it looks at Muon's defaults); the
    AdamW's beta1 stays optimizer.auxiliary_momentum at every step."""
    optimizer = build_optimizer(small_model(), MuonConfig(auxiliary="adamw"))
    cycled = OneCycleConfig(cycle_momentum=True, base_momentum=0.8, max_momentum=0.9)
    schedule = build_schedule(optimizer, cycled, 2, 10)
    muon_momenta = set()
    for step in range(1, 21):
        schedule.after_optimizer_step(step)
        muon_momenta.add(optimizer.muon.param_groups[0]["momentum"])
        assert all(g["betas"][0] == 0.9 for g in optimizer.auxiliary.param_groups)
    assert min(muon_momenta) == pytest.approx(0.8, abs=1e-3)


def test_the_range_test_sweeps_muons_rate_and_keeps_the_auxiliarys():
    model = small_model()
    optimizer = build_optimizer(model, MuonConfig(lr=1e-4, auxiliary_lr=0.1))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    step = TrainStep(model, nn.CrossEntropyLoss(), optimizer, scaler, NO_CLIPPING, CPU)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=generator), torch.randint(10, (8,)))] * 4
    settings = LRFindConfig(min_lr=1e-3, max_lr=1.0, num_steps=20, diverge_factor=100.0)
    curve = sweep(step, batches, settings)
    assert len(curve.losses) == 20
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(1.0)
    assert all(g["lr"] == 0.1 for g in optimizer.auxiliary.param_groups)


# --- mixup and cutmix ----------------------------------------------------------------


def images_and_labels(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(n, 1, 12, 12, generator=generator), torch.arange(n) % 10


def test_mixup_blends_each_image_with_the_next_in_the_labels_proportion():
    images, labels = images_and_labels()
    random.seed(0)
    mixed, targets, dominant = BatchMixing(10, mixup_alpha=0.4)(images, labels)
    weight = targets[0, labels[0]].item()  # labels are distinct: the first image's share
    assert 0 < weight < 1 and torch.allclose(targets.sum(1), torch.ones(8))
    partner = images.roll(1, 0)
    assert torch.allclose(mixed, weight * images + (1 - weight) * partner, atol=1e-6)
    assert torch.allclose(targets[:, labels.roll(1, 0)].diagonal(), torch.full((8,), 1 - weight))
    assert torch.equal(dominant, labels if weight >= 0.5 else labels.roll(1, 0))


def test_cutmix_pastes_a_box_whose_area_is_the_other_labels_share():
    images, labels = images_and_labels()
    for seed in range(5):
        random.seed(seed)
        mixed, targets, _ = BatchMixing(10, cutmix_alpha=1.0)(images, labels)
        pasted = (mixed != images).any(0).any(0)  # (H, W): where some image changed
        rows, cols = pasted.any(1).nonzero(), pasted.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) if len(rows) else 0
        own = 1 - box / images[0, 0].numel()
        assert torch.allclose(targets[torch.arange(8), labels], torch.full((8,), float(own)))
        assert torch.equal(mixed[..., ~pasted], images[..., ~pasted])


def test_mixed_targets_combine_with_label_smoothing():
    """The loss smooths the mixed targets: (1 - e) x mix + e / classes."""
    images, labels = images_and_labels()
    random.seed(1)
    _, targets, _ = BatchMixing(10, mixup_alpha=0.4)(images, labels)
    logits = torch.randn(8, 10, generator=torch.Generator().manual_seed(1))
    smoothed = 0.9 * targets + 0.1 / 10
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    assert nn.CrossEntropyLoss(label_smoothing=0.1)(logits, targets) == pytest.approx(expected)


def test_mixing_follows_data_augment_and_its_draws_repeat_from_the_seed():
    assert batch_mixing(compose_run([*TINY, "data.mixup_alpha=0.2"]).data, 10) is not None
    off = compose_run([*TINY, "data.mixup_alpha=0.2", "data.augment=false"]).data
    assert batch_mixing(off, 10) is None
    assert batch_mixing(compose_run(TINY).data, 10) is None
    both = BatchMixing(10, mixup_alpha=0.2, cutmix_alpha=1.0, probability=0.5)
    images, labels = images_and_labels()
    runs = []
    for _ in range(2):
        random.seed(7)
        runs.append([both(images, labels)[1] for _ in range(6)])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    assert any(t.ndim == 1 for t in runs[0]) and any(t.ndim == 2 for t in runs[0])


# --- test-time augmentation --------------------------------------------------------


def test_shifted_moves_the_image_and_repeats_its_edge():
    image = torch.arange(25.0).view(1, 1, 5, 5)
    down_right = shifted(image, 1, 1)
    assert torch.equal(down_right[..., 1:, 1:], image[..., :-1, :-1])
    assert torch.equal(down_right[..., 0, 1:], image[..., 0, :-1]), "the top row repeated"
    assert torch.equal(shifted(image, -2, -2)[..., :3, :3], image[..., 2:, 2:])


def test_translate_tta_weighs_the_shifted_views_half():
    model = small_model().eval()
    images, _ = images_and_labels()
    images = nn.functional.interpolate(images, size=28)
    tta = TTA(flip=True, translate=1)
    with torch.no_grad():
        centred = (model(images) + model(images.flip(3))) / 2
        moved = [shifted(images, 1, 1), shifted(images, -1, -1)]
        others = sum(model(m) + model(m.flip(3)) for m in moved) / 4
        assert torch.allclose(tta(model, images), (centred + others) / 2, atol=1e-5)
        assert torch.allclose(TTA()(model, images), model(images))


# --- what a CUDA graph cannot hold --------------------------------------------------


def test_a_cuda_graph_is_declined_for_muon_and_for_mixing(caplog: pytest.LogCaptureFixture):
    """Fakes nothing: the device is only named (no CUDA call is made before the check
    declines), so the refusal can be read on a CPU."""
    bf16 = Precision("bf16", torch.bfloat16, False, "amp=bf16")
    cuda = Runtime(torch.device("cuda"), bf16, torch.channels_last)
    model, scaler = small_model(), torch.amp.GradScaler("cpu", enabled=False)
    cases = [
        (build_optimizer(model, MuonConfig()), None, "optimizer=muon"),
        (
            torch.optim.SGD(model.parameters(), lr=0.1, fused=True),
            BatchMixing(10, mixup_alpha=0.2),
            "mixup and cutmix",
        ),
    ]
    for optimizer, mixing, reason in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            step = build_train_step(
                model,
                nn.CrossEntropyLoss(),
                optimizer,
                scaler,
                NO_CLIPPING,
                cuda,
                2.0,
                cuda_graph=True,
                cycles_momentum=False,
                mixing=mixing,
            )
        assert type(step) is TrainStep
        assert "cuda_graph=true ignored" in caplog.text and reason in caplog.text


# --- the speedrun's script ----------------------------------------------------------


def test_the_speedrun_script_tables_and_plots_recorded_runs(tmp_path: Path):
    """scripts/speedrun.py --from: the docs' table (mean and each seed) and plot from the
    figures it recorded, without training."""
    recorded = tmp_path / "speedrun.jsonl"
    runs = [
        {
            "point": "speedrun",
            "seed": seed,
            "command_s": 44.0 + seed,
            "train_s": 41.0,
            "test_acc": acc,
        }
        for seed, acc in enumerate((93.16, 93.01, 92.98))
    ]
    runs.append(
        {"point": "muon_6_epochs", "seed": 0, "command_s": 62.0, "train_s": 60.0, "test_acc": 93.41}
    )
    recorded.write_text("".join(json.dumps(run) + "\n" for run in runs))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "speedrun.py"),
            "--from",
            str(recorded),
            "--points",
            "speedrun",
            "--plot",
            str(tmp_path / "frontier.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| speedrun |")]
    assert "`stable-cnn-train experiment=fashion_mnist_speedrun`" in row
    assert "93.05% (93.16, 93.01, 92.98) | 45.0 s |" in row
    assert "muon_6_epochs" not in done.stdout, "only the points asked for"
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_a_checkpoint_from_before_these_keys_existed_still_resumes():
    """An older run's recorded config lacks the recipe tools' keys (and accumulation's):
    it resumes with them at the values it ran with, and is refused with any other."""
    from omegaconf import OmegaConf

    from stable_cnn.errors import UserError
    from stable_cnn.state.record import CheckpointRecord
    from stable_cnn.state.resume import check_same_config

    now = OmegaConf.to_container(compose_config(TINY), resolve=True)
    before = copy.deepcopy(now)
    for key in ("mixup_alpha", "cutmix_alpha", "mix_prob", "tta_translate"):
        del before["data"][key]
    del before["trainer"]["accumulate_grad_batches"]
    old = CheckpointRecord({}, before, (), None, None, None)
    check_same_config(old, now, Path("old.pt"))  # no error
    mixed = {**now, "data": {**now["data"], "mixup_alpha": 0.2}}
    with pytest.raises(UserError, match=r"data\.mixup_alpha differ"):
        check_same_config(old, mixed, Path("old.pt"))
