"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural
Networks", 2017; fastai's ``lr_find``; Lightning's LearningRateFinder), on the run's own
model, data, augmentation, precision, clipping and gradient accumulation: the learning
rate grows exponentially from ``min_lr`` to ``max_lr``, one value per optimizer step,
until the loss has clearly diverged. Where the smoothed loss turns upwards is the edge of
stability; the suggestion keeps a factor of two below it (``suggest``).

Everything it trains is its own and is thrown away: a run that uses its suggestion starts
from the initial weights, data order and random streams it would have had anyway.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from stable_cnn.config import RunConfig
from stable_cnn.config.lr_find import LRFindConfig
from stable_cnn.data.build import batch_mixing
from stable_cnn.data.splits import DataSplits
from stable_cnn.errors import ConfigError
from stable_cnn.models.build import build_model
from stable_cnn.state.progress import EpochProgress
from stable_cnn.system.distributed import ALONE, World, wrap_for_training
from stable_cnn.system.hardware import Runtime, compile_model
from stable_cnn.system.plotting import pyplot
from stable_cnn.system.seeding import seed_everything
from stable_cnn.training.build import build_data, choose_runtime, model_config, training_loss
from stable_cnn.training.epoch import chunked, to_device
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.step import TrainStep

log = logging.getLogger("stable_cnn")

# The host reads the losses every this many steps (one read, not one per step: a GPU never
# waits for Python in between); divergence is noticed at most this many steps late.
READ_EVERY = 10
# The loss is smoothed over a quarter of a decade of learning rates, centred (no lag: a
# turn of the curve stays at the learning rate where it happened): 15 steps of the
# default sweep. Measured on the default recipe, seeds 0-3: with this window the edge
# below moved between 0.25 and 0.30; with a tenth of a decade, between 0.21 and 0.42.
SMOOTHING_DECADES = 0.25
# The edge of stability: the largest learning rate, from the smoothed loss's minimum on,
# at which the smoothed loss is still within this fraction of that minimum. Past it the
# loss grows: the steps have become too large for the curvature the weights meet. (The
# minimum itself sits anywhere on a flat bottom; the rise after it is steep, so the edge
# moves less from one seed or machine to the next.)
EDGE_TOLERANCE = 0.05
# The suggestion: a factor of two below the edge. Smith's one-cycle policy peaks at the
# edge itself, and our schedules warm up to their peak as it does; the factor of two
# keeps the suggestion on the safe side of one sweep's noise. fastai's "minimum / 10"
# keeps a whole decade, which costs a clipped, warmed-up recipe accuracy
# (docs/lr_find.md compares the rules on the stability map).
MARGIN_BELOW_EDGE = 2.0
RULE = (
    "max_stable_lr / 2, where max_stable_lr is the largest learning rate, from the "
    f"minimum of the smoothed loss on, at which the smoothed loss is within "
    f"{EDGE_TOLERANCE:.0%} of that minimum"
)


@dataclass
class LRCurve:
    """What the sweep measured: one loss per optimizer step, at its learning rate."""

    lrs: list[float]
    losses: list[float]
    diverged: bool  # the sweep stopped before max_lr: the loss had clearly diverged
    seconds: float
    stopped_by: str = ""  # a signal's name, when one stopped the sweep

    def smoothed(self) -> list[float]:
        """The centred running mean of the losses (the window shrinks at the ends); Inf
        where the window holds a NaN/Inf loss: that learning rate counts as diverged."""
        half = 0
        if len(self.lrs) > 1:
            steps_per_decade = 1 / math.log10(self.lrs[1] / self.lrs[0])
            half = int(SMOOTHING_DECADES * steps_per_decade / 2)
        smooth = []
        for index in range(len(self.losses)):
            window = self.losses[max(0, index - half) : index + half + 1]
            finite = all(math.isfinite(value) for value in window)
            smooth.append(sum(window) / len(window) if finite else math.inf)
        return smooth


@dataclass
class LRFinding:
    suggested_lr: float
    max_stable_lr: float
    curve: LRCurve

    def record(self, settings: LRFindConfig) -> dict:
        """lr_find.json's content."""
        smooth = self.curve.smoothed()
        return {
            "suggested_lr": self.suggested_lr,
            "max_stable_lr": self.max_stable_lr,
            "rule": RULE,
            "settings": asdict(settings),
            "steps": len(self.curve.lrs),
            "stopped_at_divergence": self.curve.diverged,
            "seconds": round(self.curve.seconds, 2),
            "curve": [
                {"lr": lr, "loss": loss, "smoothed_loss": smoothed}
                for lr, loss, smoothed in zip(
                    self.curve.lrs, self.curve.losses, smooth, strict=True
                )
            ],
        }


def learning_rates(settings: LRFindConfig) -> list[float]:
    """``num_steps`` learning rates from ``min_lr`` to ``max_lr``, evenly spaced in log."""
    ratio = settings.max_lr / settings.min_lr
    last = settings.num_steps - 1
    return [settings.min_lr * ratio ** (step / last) for step in range(settings.num_steps)]


def endless(batches: Iterable) -> Iterator:
    """The training batches, epoch after epoch (each epoch in its own shuffled order)."""
    while True:
        yield from batches


def sweep(
    train_step: TrainStep,
    batches: Iterable,
    settings: LRFindConfig,
    accumulate: int = 1,
    stop_requested: Callable[[], str] = lambda: "",
) -> LRCurve:
    """Train one optimizer step per learning rate of ``learning_rates(settings)``; stop
    early once the loss has clearly diverged (``has_diverged``), or when
    ``stop_requested()`` names a signal (checked where the host reads the losses)."""
    runtime, optimizer = train_step.runtime, train_step.optimizer
    train_step.model.train()
    progress = EpochProgress.start(runtime.device)
    rates = learning_rates(settings)
    pending: list[torch.Tensor] = []
    losses: list[float] = []
    started = time.perf_counter()
    diverged, stopped_by = False, ""
    # optimizer=muon: only Muon's groups, whose lr is optimizer.lr; the rest keep theirs
    swept = getattr(optimizer, "swept_groups", optimizer.param_groups)
    for lr, micro_batches in zip(rates, chunked(endless(batches), accumulate), strict=False):
        for group in swept:
            group["lr"] = lr
        train_step.run(to_device(micro_batches, runtime), progress)
        pending.append(train_step.last_loss.float())
        if len(pending) == READ_EVERY or len(losses) + len(pending) == len(rates):
            losses += torch.stack(pending).tolist()  # the one host read per READ_EVERY steps
            pending.clear()
            if has_diverged(
                LRCurve(rates[: len(losses)], losses, False, 0.0), settings.diverge_factor
            ):
                diverged = True
                break
            stopped_by = stop_requested()
            if stopped_by:
                break
    seconds = time.perf_counter() - started
    return LRCurve(rates[: len(losses)], losses, diverged, seconds, stopped_by)


def has_diverged(curve: LRCurve, factor: float) -> bool:
    """Most of the last READ_EVERY steps' losses are NaN/Inf, or their smoothed loss
    exceeds ``factor`` x the lowest smoothed loss before them, or is above where the sweep
    started: it has lost all it learnt (clipping bounds each step, so a clipped recipe's
    loss climbs back to chance rather than exploding)."""
    block = curve.losses[-READ_EVERY:]
    if sum(not math.isfinite(loss) for loss in block) * 2 > len(block):
        return True  # the step's guard skipped them, but the rates are past any use
    # the windows free of NaN/Inf: a stray one goes on (no window that holds it can be the
    # minimum or the edge), a run of them ends the sweep by the rule above
    smooth = [value for value in curve.smoothed() if math.isfinite(value)]
    if len(smooth) <= 2 * READ_EVERY:
        return False
    start, lowest, latest = smooth[0], min(smooth[:-READ_EVERY]), smooth[-1]
    learnt = lowest < 0.9 * start  # the curve did come down before
    return latest > factor * lowest or (learnt and latest > start)


def suggest(curve: LRCurve, settings: LRFindConfig) -> LRFinding:
    """The suggestion by ``RULE``, and the edge of stability it keeps away from; a curve
    that never turned upwards (or never was finite) is one line asking for other bounds."""
    smooth = curve.smoothed()
    if not any(math.isfinite(value) for value in smooth):
        raise ConfigError(
            f"lr_find: the loss was NaN/Inf from lr {settings.min_lr:g} on: lower "
            f"lr_find.min_lr, or give optimizer.lr by hand"
        )
    lowest = min(range(len(smooth)), key=smooth.__getitem__)
    edge = lowest
    while edge + 1 < len(smooth) and smooth[edge + 1] <= smooth[lowest] * (1 + EDGE_TOLERANCE):
        edge += 1
    if edge == len(smooth) - 1 and not curve.diverged:
        raise ConfigError(
            f"lr_find: the loss was still falling at lr_find.max_lr={settings.max_lr:g}: "
            f"raise lr_find.max_lr (or lr_find.num_steps), or give optimizer.lr by hand"
        )
    max_stable = curve.lrs[edge]
    return LRFinding(max_stable / MARGIN_BELOW_EDGE, max_stable, curve)


def run_range_test(run: RunConfig, settings: LRFindConfig, folder: Path) -> LRFinding:
    """``stable-cnn-lr-find``: seeded and placed as the run would be, in one process
    (Ctrl-C ends it at once: there is nothing to save)."""
    seed_everything(run.trainer.seed, run.trainer.deterministic)
    finding = find_learning_rate(run, choose_runtime(run), settings, folder)
    assert finding is not None  # no stop_requested: only a signal's default action ends it
    return finding


def find_learning_rate(
    run: RunConfig,
    runtime: Runtime,
    settings: LRFindConfig,
    folder: Path,
    world: World = ALONE,
    stop_requested: Callable[[], str] = lambda: "",
    run_data: DataSplits | None = None,
) -> LRFinding | None:
    """Build the run's model as training would (from the run's seed: the caller reseeds
    before it builds the run itself), sweep, and write the findings to ``folder``; a
    signal (``stop_requested()`` names it) ends it early, with None. The data is
    ``run_data`` where given (decoded once for both: its training batches are put back
    at their start afterwards), else built here."""
    data = run_data if run_data is not None else build_data(run, world, runtime)
    start = data.train.state_dict()
    try:
        spec = model_config(run, data.info)
        model = build_model(spec).to(runtime.device, memory_format=runtime.memory_format)
        network: nn.Module = wrap_for_training(model, world, runtime.device)
        if run.trainer.compile:
            network = compile_model(network, runtime.device)
        criterion = training_loss(run.trainer, data, runtime.device)
        optimizer = build_optimizer(model, replace(run.optimizer, lr=settings.min_lr))
        scaler = torch.amp.GradScaler(
            runtime.device.type, enabled=runtime.precision.use_grad_scaler
        )
        mixing = batch_mixing(run.data, data.info.num_classes)
        train_step = TrainStep(
            network, criterion, optimizer, scaler, run.clipping, runtime, mixing=mixing
        )
        log.info(
            "lr_find: %d steps from lr %g to %g (stops once the loss has diverged)",
            settings.num_steps,
            settings.min_lr,
            settings.max_lr,
        )
        curve = sweep(
            train_step, data.train, settings, run.trainer.accumulate_grad_batches, stop_requested
        )
    finally:
        if run_data is None:
            data.close()
        else:
            data.train.load_state_dict(start)
    if curve.stopped_by:
        return None
    finding = suggest(curve, settings)
    write_findings(finding, settings, folder)
    return finding


def write_findings(finding: LRFinding, settings: LRFindConfig, folder: Path) -> None:
    """lr_find.json, lr_find.png and TensorBoard scalars (lr_find/*, by step) in ``folder``."""
    from torch.utils.tensorboard import SummaryWriter

    folder.mkdir(parents=True, exist_ok=True)
    for earlier in folder.glob("events.out.tfevents.*"):  # one curve: an interrupted search's goes
        earlier.unlink()
    (folder / "lr_find.json").write_text(json.dumps(finding.record(settings), indent=1) + "\n")
    curve, smooth = finding.curve, finding.curve.smoothed()
    writer = SummaryWriter(log_dir=str(folder))
    try:
        for step, (lr, loss, smoothed) in enumerate(
            zip(curve.lrs, curve.losses, smooth, strict=True)
        ):
            writer.add_scalar("lr_find/lr", lr, step)
            if math.isfinite(loss):
                writer.add_scalar("lr_find/loss", loss, step)
            if math.isfinite(smoothed):
                writer.add_scalar("lr_find/smoothed_loss", smoothed, step)
        writer.add_text("lr_find/suggestion", f"suggested_lr {finding.suggested_lr:.4g}: {RULE}")
    finally:
        writer.close()
    plot_curve(finding, folder / "lr_find.png")


def plot_curve(finding: LRFinding, path: Path) -> None:
    plt = pyplot()
    if plt is None:
        log.warning("no lr_find.png: matplotlib is missing (pip install matplotlib)")
        return
    curve, smooth = finding.curve, finding.curve.smoothed()
    finite = [value for value in smooth if math.isfinite(value)]
    figure, axes = plt.subplots(figsize=(7, 4.2))
    axes.plot(curve.lrs, curve.losses, color="0.75", linewidth=0.8, label="loss per step")
    axes.plot(curve.lrs, smooth, color="C0", label="smoothed")
    axes.axvline(
        finding.max_stable_lr,
        color="C3",
        linestyle=":",
        label=f"max_stable_lr {finding.max_stable_lr:.3g}",
    )
    axes.axvline(finding.suggested_lr, color="C2", label=f"suggested_lr {finding.suggested_lr:.3g}")
    axes.set_xscale("log")
    if finite:  # the diverging tail would flatten the rest
        low = min(finite)
        axes.set_ylim(low - 0.05 * abs(low), max(finite[0], low) * 1.5)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title("learning-rate range test")
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
