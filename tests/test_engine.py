"""The optimizer step (unscale -> clip -> step), clipping, and the GradScaler's lifetime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stable_cnn.config import ClippingConfig
from stable_cnn.training import fit as train_module
from stable_cnn.training.step import clip_gradients, optimizer_step
from tests.conftest import TINY, compose_run


def tiny_model_and_loss(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    inputs, targets = torch.randn(32, 8) * 10, torch.randint(0, 3, (32,))
    loss = nn.functional.cross_entropy(model(inputs), targets)
    return model, loss


def total_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in model.parameters()])
    ).item()


def test_step_clips_unscaled_gradients_then_steps_once():
    """With a 2**16 loss scale, clipping before unscaling would shrink the step 65536x."""
    max_norm, lr = 0.5, 0.1
    model, loss = tiny_model_and_loss()
    # The expected update, computed by hand: real gradients, clipped, one SGD step.
    grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert norm > max_norm, "the test needs gradients that get clipped"
    expected = [p.detach() - lr * g * (max_norm / norm) for p, g in zip(model.parameters(), grads)]

    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    step = optimizer_step(
        loss, list(model.parameters()), optimizer, scaler, ClippingConfig("norm", max_norm=max_norm)
    )
    assert step.applied
    assert step.grad_norm.item() == pytest.approx(norm.item(), rel=1e-5)
    for param, want in zip(model.parameters(), expected):
        torch.testing.assert_close(param.detach(), want, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters()), "gradients are cleared after the step"


def test_norm_clipping_caps_the_norm_and_reports_both_norms():
    model, loss = tiny_model_and_loss()
    loss.backward()
    before = total_grad_norm(model)
    reported, after = clip_gradients(
        list(model.parameters()), ClippingConfig("norm", max_norm=0.25)
    )
    assert reported.item() == pytest.approx(before, rel=1e-5)
    assert total_grad_norm(model) <= 0.25 * (1 + 1e-5)
    assert after.item() == pytest.approx(total_grad_norm(model), rel=1e-5)
    assert after.item() <= 0.25


def test_value_clipping_bounds_every_element():
    model, loss = tiny_model_and_loss()
    loss.backward()
    before, after = clip_gradients(
        list(model.parameters()), ClippingConfig("value", max_value=0.01)
    )
    assert max(p.grad.abs().max().item() for p in model.parameters()) <= 0.01
    assert after.item() == pytest.approx(total_grad_norm(model), rel=1e-5)
    assert after < before


def test_no_clipping_leaves_gradients_and_reports_their_norm():
    model, loss = tiny_model_and_loss()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    reported, after = clip_gradients(list(model.parameters()), ClippingConfig("none"))
    assert reported.item() == pytest.approx(total_grad_norm(model), rel=1e-5)
    assert torch.equal(after, reported)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, model.parameters()))


def test_one_grad_scaler_per_run_not_per_epoch(tmp_path, monkeypatch):
    """The tutorial built a GradScaler inside train_one_epoch; we build one per run."""
    created = []

    class CountingScaler(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            created.append(self)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.amp, "GradScaler", CountingScaler)
    run = compose_run([*TINY, "amp=fp16", "trainer.epochs=3", "data.val_size=64"])
    results = train_module.train(run, tmp_path, {})
    assert results["epochs"] == 3
    assert len(created) == 1 and created[0].is_enabled()
