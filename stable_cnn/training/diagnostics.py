"""A look inside the network while it trains: per epoch, weight norms and BatchNorm
statistics per stage; every N epochs, weight and gradient histograms, a grid of augmented
training images and a confusion-matrix figure.

Everything here runs between epochs, on values the training step does not depend on:
the gradient snapshot uses a forked RNG and puts BatchNorm's running statistics back,
so turning figures on or off does not change the run's numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from stable_cnn.system.hardware import Runtime
from stable_cnn.system.plotting import pyplot
from stable_cnn.training.step import autocast

log = logging.getLogger(__name__)


def stages(model: nn.Module) -> dict[str, nn.Module]:
    """The model's parts, input to output, whose diagnostics are shown: its top-level
    modules that hold weights (the SmallCNN's stage1..3 and classifier; a ResNet's conv1,
    layer1..4 and fc; the same for any model)."""
    return {
        name: child
        for name, child in model.named_children()
        if any(p.dim() > 1 for p in child.parameters())
    }


def stage_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every stage's conv and linear weights, flattened, on the CPU (for histograms)."""
    return {
        name: torch.cat(
            [p.detach().float().flatten().cpu() for p in stage.parameters() if p.dim() > 1]
        )
        for name, stage in stages(model).items()
    }


def model_health(model: nn.Module) -> dict[str, float]:
    """L2 norm of each stage's conv/linear weights, and the range of its BatchNorm running
    means and variances (a stage whose variance collapses or explodes shows here first)."""
    names, values = [], []
    for stage_name, stage in stages(model).items():
        weights = [p.detach().float() for p in stage.parameters() if p.dim() > 1]
        names.append(f"weights/norm_{stage_name}")
        values.append(torch.linalg.vector_norm(torch.cat([w.flatten() for w in weights])))
        norms = [
            m
            for m in stage.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None
        ]
        if not norms:  # the head, or an ablation without BatchNorm
            continue
        for statistic in ("running_mean", "running_var"):
            stacked = torch.cat([getattr(m, statistic).float() for m in norms])
            names += [
                f"weights/batchnorm_{stage_name}_{statistic}_min",
                f"weights/batchnorm_{stage_name}_{statistic}_max",
            ]
            values += [stacked.min(), stacked.max()]
    return dict(zip(names, torch.stack(values).tolist(), strict=True))  # one host read


def gradient_snapshot(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    criterion: nn.Module,
    runtime: Runtime,
) -> dict[str, torch.Tensor]:
    """Each stage's gradient on one batch, without changing the model, its BatchNorm
    statistics, the optimizer or any random stream."""
    norm_buffers = [
        b
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for b in m.buffers()
    ]
    saved = [b.clone() for b in norm_buffers]
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.train()
        model.zero_grad(set_to_none=True)
        with autocast(runtime.device, runtime.precision):
            loss = criterion(model(images), labels)
        loss.float().backward()
    grads = {
        name: torch.cat(
            [
                p.grad.detach().float().flatten()
                for p in stage.parameters()
                if p.grad is not None and p.dim() > 1
            ]
        ).cpu()
        for name, stage in stages(model).items()
    }
    model.zero_grad(set_to_none=True)
    for buffer, value in zip(norm_buffers, saved, strict=True):
        buffer.copy_(value)
    return grads


def confusion_figure(confusion: torch.Tensor, class_names: tuple[str, ...], title: str) -> Any:
    """A matplotlib figure of the confusion matrix, rows normalised to 1; None where
    matplotlib cannot be imported."""
    plt = pyplot()
    if plt is None:
        return None

    counts = confusion.double()
    rates = counts / counts.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(4.0, 0.55 * len(class_names) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    shown = axes.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axes.set_xticks(ticks, class_names, rotation=60, ha="right", fontsize=8)
    axes.set_yticks(ticks, class_names, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(class_names) <= 20:
        for row in ticks:
            for column in ticks:
                value = rates[row, column].item()
                if value >= 0.005:
                    axes.text(
                        column,
                        row,
                        f"{100 * value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.5 else "black",
                    )
    figure.colorbar(shown, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    figure.tight_layout()
    return figure


def per_class_accuracy(confusion: torch.Tensor) -> list[float | None]:
    """Percent correct per true class (rows of the confusion matrix); None for a class
    with no image in the split (0% would read as a class the model always misses)."""
    totals = confusion.sum(dim=1)
    accuracy = 100.0 * confusion.diagonal().double() / totals.clamp(min=1).double()
    return [a if n > 0 else None for a, n in zip(accuracy.tolist(), totals.tolist(), strict=True)]
