"""The run itself: build data, model, optimizer, schedule and scaler from typed config,
then for each epoch train, validate, log and checkpoint, and finally test the best
checkpoint. ``train.py`` (the Hydra entrypoint) composes the config and calls ``train``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.augment import normalize
from stable_cnn.capture import build_train_step
from stable_cnn.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from stable_cnn.config import OneCycleConfig, RunConfig
from stable_cnn.data import DatasetInfo, DataSplits, TensorBatches, build_splits
from stable_cnn.diagnostics import STAGES, confusion_figure, gradient_snapshot, model_health
from stable_cnn.ema import WeightEMA
from stable_cnn.engine import (
    EpochStats,
    EvalStats,
    TrainingDiverged,
    ensure_finite,
    evaluate,
    train_one_epoch,
)
from stable_cnn.hardware import (
    Runtime,
    choose_memory_format,
    choose_precision,
    compile_model,
    describe_cpu,
    resolve_device,
    use_tf32,
)
from stable_cnn.models import SmallCNN
from stable_cnn.optimizers import build_optimizer
from stable_cnn.preemption import GracefulStop
from stable_cnn.resume import earlier_outcome, locate_run
from stable_cnn.run_state import RunState
from stable_cnn.schedulers import build_schedule
from stable_cnn.seeding import seed_everything
from stable_cnn.tracking import FAILURE_FILE, Hparams, RunTracker, record_failure

log = logging.getLogger("stable_cnn")


def build_model(run: RunConfig, info: DatasetInfo) -> SmallCNN:
    return SmallCNN(
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        width=run.model.width,
        dropout=run.model.dropout,
        head_dropout=run.model.head_dropout,
        hidden=run.model.hidden,
        batchnorm=run.model.batchnorm,
        depth=run.model.depth,
    )


def model_config(run: RunConfig, info: DatasetInfo) -> dict[str, Any]:
    """What it takes to rebuild the model from a checkpoint."""
    return {"in_channels": info.in_channels, "num_classes": info.num_classes, **asdict(run.model)}


def epoch_summary(
    epoch: int,
    epochs: int,
    train: EpochStats,
    val: EvalStats,
    lr: float,
    ema: EvalStats | None = None,
) -> str:
    """The console line (names as in metrics.jsonl); the weight average's accuracy (ema=on),
    clip rate, skipped steps and loss spikes appear when there are any."""
    extras = [
        f"val_acc_ema {ema.accuracy:.2f}%" if ema is not None else "",
        f"clipped {100 * train.clip_fraction:.0f}%" if train.clip_fraction > 0 else "",
        f"skipped {train.nonfinite_steps}" if train.nonfinite_steps else "",
        f"amp_skipped {train.amp_skipped_steps}" if train.amp_skipped_steps else "",
        f"spikes {train.loss_spikes}" if train.loss_spikes else "",
    ]
    return (
        f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  val_loss {val.loss:.4f}  "
        f"val_acc {val.accuracy:.2f}%  lr {lr:.3g}  {train.images_per_second:,.0f} img/s  "
        f"{train.seconds:.1f}s" + "".join(f"  {extra}" for extra in extras if extra)
    )


def log_figures(
    tracker: RunTracker,
    model: SmallCNN,
    data: DataSplits,
    criterion: nn.Module,
    runtime: Runtime,
    val_stats: EvalStats,
    epoch: int,
    global_step: int,
) -> None:
    """Histograms, augmented images and the validation confusion matrix (every N epochs)."""
    images, labels, gradients = None, None, {}
    if isinstance(data.train, TensorBatches):  # an image folder's loader has no preview
        images, labels = data.train.preview(64, seed=epoch)
        batch = normalize(images, data.train.mean, data.train.std).contiguous(
            memory_format=runtime.memory_format
        )
        gradients = gradient_snapshot(model, batch, labels, criterion, runtime)
    weights = {name: torch.cat([p.detach().float().flatten().cpu() for p in
                                getattr(model, name).parameters() if p.dim() > 1])
               for name in STAGES}  # fmt: skip
    figure = confusion_figure(
        val_stats.confusion, data.info.class_names, f"validation, epoch {epoch}"
    )
    if figure is None:
        log.warning("no confusion-matrix figure: matplotlib is missing (pip install matplotlib)")
    tracker.log_figures(global_step, weights, gradients, images, figure)


def choose_runtime(run: RunConfig) -> Runtime:
    """Device, precision and memory layout for this run; logs what it chose and why."""
    if run.trainer.num_threads is not None:
        torch.set_num_threads(run.trainer.num_threads)
    device = resolve_device(run.trainer.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:N is the current device for every kernel
    precision = choose_precision(run.amp.name, device)
    memory_format = choose_memory_format(device, run.trainer.channels_last)
    if device.type == "cpu":
        log.info("device cpu, %d threads, CPU %s", torch.get_num_threads(), describe_cpu())
    else:
        log.info("device %s", device)
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    log.info("precision %s (%s), %s layout", precision.name, precision.reason, layout)
    if use_tf32(device, run.trainer.tf32) and precision.name == "fp32":
        log.info("fp32 matmuls and convolutions in TF32 (trainer.tf32=false for full fp32)")
    return Runtime(device, precision, memory_format)


class RunPreempted(Exception):
    """A signal stopped the run after it saved a resumable checkpoint."""


def train(
    run: RunConfig,
    run_dir: Path,
    composed_config: dict[str, Any],
    outputs: Path = Path("outputs"),
    hparams: Hparams | None = None,
) -> dict[str, Any]:
    """Train, validate every epoch, test the best checkpoint; returns results.json's content.
    ``hparams`` (name -> value) goes to TensorBoard's HPARAMS tab with the final metrics."""
    started = time.perf_counter()
    trainer = run.trainer
    seed_everything(trainer.seed, trainer.deterministic)  # before CUDA starts (cuBLAS)
    runtime = choose_runtime(run)
    run_dir, resume_from, resume_state = locate_run(
        trainer.resume, run_dir, outputs, composed_config, runtime
    )
    if trainer.resume is not None and (outcome := earlier_outcome(run_dir)) is not None:
        return outcome
    (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # this attempt writes its own outcome
    log.info("run folder: %s", run_dir)

    data = build_splits(run.data, runtime.device, trainer.seed)
    log.info(
        "data %s: %d train / %d val / %d test images, batch %d",
        data.info.name, data.num_train, data.num_val, data.num_test, run.data.batch_size,
    )  # fmt: skip
    if data.val_is_test:
        log.warning("validating on the test set (data.val_size=0): test accuracy is optimistic")

    model = build_model(run, data.info).to(runtime.device, memory_format=runtime.memory_format)
    log.info(
        "model SmallCNN width %d, %d ConvBlocks per stage: %.2fM parameters",
        run.model.width, run.model.depth, sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    # Train and evaluate through `network` (compiled or not); save `model`'s plain state_dict.
    network = compile_model(model, runtime.device) if trainer.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
    optimizer = build_optimizer(model, run.optimizer)
    schedule = build_schedule(optimizer, run.scheduler, trainer.epochs, len(data.train))
    # One GradScaler for the whole run: its loss scale is calibrated over many steps.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler)

    ema = None if run.ema.name == "off" else WeightEMA(model, run.ema.decay, run.ema.warmup)
    state = RunState(model, optimizer, schedule, scaler, data.train, runtime,
                     model_config(run, data.info), composed_config, ema,
                     class_names=data.info.class_names)  # fmt: skip
    if resume_state is not None:
        state.load_state_dict(resume_state, resume_from)
        log.info("resuming from %s (%s, step %d)", resume_from, state.where(),
                 state.counters.global_step)  # fmt: skip
    counters = state.counters

    train_step = build_train_step(
        network, criterion, optimizer, scaler, run.clipping, runtime,
        run.diagnostics.loss_spike_factor, trainer.cuda_graph,
        cycles_momentum=isinstance(run.scheduler, OneCycleConfig) and run.scheduler.cycle_momentum,
    )  # fmt: skip
    tracker = RunTracker(run_dir, resume_step=counters.global_step, epochs_done=counters.epoch)
    tta = run.data.tta_flip  # validation and test on each image and its mirror image
    checkpoints = run_dir / "checkpoints"
    try:
        with GracefulStop() as stop:
            for epoch in range(counters.epoch + 1, trainer.epochs + 1):
                train_stats, state.progress = train_one_epoch(
                    train_step, data.train, schedule, counters.global_step,
                    trainer.log_every_n_steps, tracker.log_step,
                    progress_label=f"epoch {epoch}/{trainer.epochs}",
                    progress_bar=trainer.progress_bar, progress=state.progress,
                    stop_requested=lambda: stop.signal_name or "",
                    on_nonfinite=trainer.on_nonfinite,
                    max_consecutive_nonfinite=trainer.max_consecutive_nonfinite, ema=ema,
                )  # fmt: skip
                counters.global_step = train_stats.global_step
                if not train_stats.completed:
                    save_checkpoint(state.state_dict(), checkpoints / "last.pt")
                    where = f"stopped in epoch {epoch} at step {counters.global_step}"
                    if stop.requested:
                        raise RunPreempted(
                            f"{stop.signal_name}: {where}; checkpoint saved; continue with "
                            f"trainer.resume={run_dir}"
                        )
                    raise TrainingDiverged(
                        f"{train_stats.stop_reason}: {where} (trainer.on_nonfinite="
                        f"{trainer.on_nonfinite}); the weights from before that step are in "
                        f"{checkpoints / 'last.pt'}; lower optimizer.lr or keep clipping=norm"
                    )
                lr, state.progress = state.progress.start_lr, None
                raw_stats = evaluate(network, data.val, runtime, tta)
                ensure_finite("validation loss", raw_stats.loss, counters.global_step)
                # The weights the run keeps, selects by and tests: the average with ema=on.
                val_stats = (
                    raw_stats if ema is None else evaluate(ema.model, data.val, runtime, tta)
                )
                ensure_finite("validation loss", val_stats.loss, counters.global_step)
                schedule.after_epoch(val_stats.accuracy)
                counters.epoch = epoch

                tracker.log_epoch(epoch, lr, train_stats, raw_stats, model_health(model),
                                  ema=None if ema is None else val_stats)  # fmt: skip
                every = run.diagnostics.figures_every_n_epochs
                if every is not None and (epoch % every == 0 or epoch == trainer.epochs):
                    log_figures(tracker, model, data, criterion, runtime, val_stats, epoch,
                                counters.global_step)  # fmt: skip
                improved = val_stats.accuracy > counters.best_val_acc
                summary = epoch_summary(epoch, trainer.epochs, train_stats, raw_stats, lr,
                                        ema=None if ema is None else val_stats)  # fmt: skip
                log.info("%s%s", summary, "  (best)" if improved else "")
                if improved:
                    counters.best_val_acc, counters.best_epoch = val_stats.accuracy, epoch
                saved = state.state_dict()
                if improved:  # best.pt first: last.pt must never name a best that is not on disk
                    save_checkpoint(saved, checkpoints / "best.pt")
                save_checkpoint(saved, checkpoints / "last.pt")
                if stop.requested and epoch < trainer.epochs:  # arrived in validation or saving
                    raise RunPreempted(
                        f"{stop.signal_name}: stopped after epoch {epoch}; checkpoint saved; "
                        f"continue with trainer.resume={run_dir}"
                    )
                patience = trainer.early_stopping_patience
                if patience is not None and epoch - counters.best_epoch >= patience:
                    log.info("early stopping: no better val_acc for %d epochs", patience)
                    break
    except TrainingDiverged as err:
        record_failure(run_dir, "diverged", reason=str(err).split(":", 1)[0], message=str(err))
        final = {"final/epochs": float(counters.epoch)}
        if counters.best_epoch > 0:
            final["final/best_val_acc"] = counters.best_val_acc
        tracker.log_hparams(hparams or {}, final, succeeded=False, global_step=counters.global_step)
        tracker.close()
        raise
    except RunPreempted as err:
        record_failure(run_dir, "interrupted", reason=str(err).split(";", 1)[0], message=str(err))
        tracker.close()
        raise

    best_path = checkpoints / "best.pt"
    best = load_checkpoint(best_path)
    load_model_weights(model, best, best_path)  # `network` shares them
    if ema is not None:
        ema.load_state_dict(best["ema"])
    test_stats = evaluate(network if ema is None else ema.model, data.test, runtime, tta)
    results = {
        "best_val_acc": counters.best_val_acc,
        "best_epoch": counters.best_epoch,
        "test_acc": test_stats.accuracy,
        "test_loss": test_stats.loss,
        "epochs": counters.epoch,
        "global_step": counters.global_step,
        "wall_s": time.perf_counter() - started,
        "device": str(runtime.device),
        "precision": runtime.precision.name,
        "weights": "last step" if ema is None else "ema",  # which weights were tested
    }
    tracker.log_results(results, counters.global_step)
    final = {
        "final/best_val_acc": results["best_val_acc"],
        "final/test_acc": results["test_acc"],
        "final/wall_s": results["wall_s"],
        "final/epochs": float(results["epochs"]),
    }
    tracker.log_hparams(hparams or {}, final, succeeded=True, global_step=counters.global_step)
    tracker.close()
    log.info(
        "test of best checkpoint (epoch %d): test_acc %.2f%%  test_loss %.4f  (%.0fs in all)",
        counters.best_epoch, test_stats.accuracy, test_stats.loss, results["wall_s"],
    )  # fmt: skip
    return results
