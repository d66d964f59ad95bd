"""The run itself: start it (``started_run``: seed, device, the folder every process
agrees on), build what it needs (training/build.py), then for each epoch train,
validate, log and checkpoint, and finally test the best checkpoint (``train_started``).
stable-cnn-train (cli/train.py) composes the config and calls the two, with
optimizer.lr=auto's range test (training/auto_lr.py) between them.

Every process of a distributed run goes through the same lines: each trains on its
share of the data (DDP averages the gradients), the evaluations and the decisions
are shared, and rank 0 alone writes (its tracker; the others' is silent).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from stable_cnn.config import RunConfig
from stable_cnn.data.augment import normalize
from stable_cnn.data.build import test_time_augmentation
from stable_cnn.data.splits import DataSplits
from stable_cnn.data.tensors import TensorBatches
from stable_cnn.errors import ConfigError, TrainingDiverged
from stable_cnn.state.checkpoint import (
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
    save_checkpoint_copy,
)
from stable_cnn.state.record import CheckpointRecord
from stable_cnn.state.resume import data_as_it_started, earlier_outcome
from stable_cnn.state.run_files import FAILURE_FILE
from stable_cnn.state.run_lock import RunLock
from stable_cnn.system.distributed import (
    ALONE,
    World,
)
from stable_cnn.system.hardware import (
    Runtime,
)
from stable_cnn.system.seeding import seed_everything
from stable_cnn.system.signals import GracefulStop
from stable_cnn.training.build import (
    Training,
    agree_on_run,
    build_training,
    choose_runtime,
)
from stable_cnn.training.diagnostics import (
    confusion_figure,
    gradient_snapshot,
    model_health,
    stage_weights,
)
from stable_cnn.training.epoch import (
    EpochLoop,
    EpochSettings,
    EpochStats,
    ensure_finite,
    train_one_epoch,
)
from stable_cnn.training.evaluation import EvalStats, evaluate
from stable_cnn.training.monitor import Verdict
from stable_cnn.training.profiling import ProfiledStep
from stable_cnn.training.trackers import RunLabels, flat_params, in_folder
from stable_cnn.training.tracking import Hparams, RunTracker

log = logging.getLogger("stable_cnn")


def epoch_summary(
    epoch: int,
    epochs: int,
    train: EpochStats,
    val: EvalStats,
    lr_peak: float,
    ema: EvalStats | None = None,
) -> str:
    """The console line (names as in metrics.jsonl; lr_peak: the epoch's highest rate);
    the weight average's accuracy (ema=on), clip rate, skipped steps and loss spikes
    appear when there are any."""
    extras = [
        f"val_acc_ema {ema.accuracy:.2f}%" if ema is not None else "",
        f"clipped {100 * train.clip_fraction:.0f}%" if train.clip_fraction > 0 else "",
        f"skipped {train.nonfinite_steps}" if train.nonfinite_steps else "",
        f"amp_skipped {train.amp_skipped_steps}" if train.amp_skipped_steps else "",
        f"spikes {train.loss_spikes}" if train.loss_spikes else "",
    ]
    return (
        f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  val_loss {val.loss:.4f}  "
        f"val_acc {val.accuracy:.2f}%  lr_peak {lr_peak:.3g}  "
        f"{train.images_per_second:,.0f} img/s  "
        f"{train.seconds:.1f}s" + "".join(f"  {extra}" for extra in extras if extra)
    )


def log_figures(
    tracker: RunTracker,
    model: nn.Module,
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
        # every process: under SyncBatchNorm its forward pass is a collective
        gradients = gradient_snapshot(model, batch, labels, criterion, runtime)
    if not tracker.writes:
        return
    weights = stage_weights(model)
    figure = confusion_figure(
        val_stats.confusion, data.info.class_names, f"validation, epoch {epoch}"
    )
    if figure is None:
        log.warning("no confusion-matrix figure: matplotlib is missing (pip install matplotlib)")
    tracker.log_figures(global_step, weights, gradients, images, figure)


class RunPreempted(Exception):
    """A signal stopped the run after it saved a resumable checkpoint."""


class TrialPruned(Exception):
    """The search's pruner stopped this trial's run after an epoch (checkpoint saved)."""

    def __init__(self, after: str) -> None:
        super().__init__(f"pruned {after}")
        self.after = after  # e.g. "after epoch 2 (val_acc 41.20%)"


class EpochReport(Protocol):
    """Where a search's trial hears of each epoch (studies/optuna_study.py)."""

    def should_stop(self, epoch: int, value: float, last: bool) -> bool: ...


@dataclass
class RunStart:
    """Where a run goes on, as every process agreed (``started_run``): its config (a
    resumed run's data settled as it started), folder, device and what it resumes; or
    the outcome of a run that had finished already."""

    run: RunConfig
    run_dir: Path
    runtime: Runtime
    resume: tuple[Path, dict[str, Any]] | None
    outcome: dict[str, Any] | None
    started: float  # time.perf_counter() at the start: results.json's wall_s counts from here


@contextmanager
def started_run(
    run: RunConfig,
    run_dir: Path,
    composed_config: dict[str, Any],
    outputs: Path = Path("outputs"),
    world: World = ALONE,
    on_run_folder: Callable[[Path], None] | None = None,
) -> Iterator[RunStart]:
    """Seed, choose the device, agree on the run's folder (a new one, or the run it
    resumes) and hold it as its one live writer until the run ends. ``on_run_folder`` is
    told, on every process, when the run goes on in a folder other than ``run_dir``."""
    started = time.perf_counter()
    seed_everything(run.trainer.seed, run.trainer.deterministic)  # before CUDA starts (cuBLAS)
    runtime = choose_runtime(run, world)
    lock = RunLock() if world.is_main else None  # one live writer per run folder
    requested_dir = run_dir
    run_dir, resume_from, resume_state = agree_on_run(
        run.trainer.resume, run_dir, outputs, composed_config, runtime, world, lock
    )
    if run_dir != requested_dir and on_run_folder is not None:
        on_run_folder(run_dir)
    try:
        if run.trainer.resume is not None and (outcome := earlier_outcome(run_dir)) is not None:
            yield RunStart(run, run_dir, runtime, None, outcome, started)
            return
        if world.is_main:
            (run_dir / FAILURE_FILE).unlink(missing_ok=True)  # this attempt writes its outcome
        resume = None if resume_state is None else (resume_from, resume_state)
        if resume_state is not None:  # the images it started on, settled as they were
            record = CheckpointRecord.read(resume_state, resume_from)
            run = replace(run, data=data_as_it_started(run.data, record))
            composed_config["data"]["sampling"] = run.data.sampling
        yield RunStart(run, run_dir, runtime, resume, None, started)
    finally:
        if lock is not None:
            lock.release()


def train(
    run: RunConfig,
    run_dir: Path,
    composed_config: dict[str, Any],
    outputs: Path = Path("outputs"),
    hparams: Hparams | None = None,
    world: World = ALONE,
) -> dict[str, Any]:
    """A whole run with a given learning rate: ``started_run``, then ``train_started``;
    returns results.json's content. (stable-cnn-train does the two itself, with
    optimizer.lr=auto's range test between them.)"""
    if run.optimizer.lr == "auto":
        raise ConfigError("optimizer.lr=auto is found by stable-cnn-train: give a number here")
    with started_run(run, run_dir, composed_config, outputs, world) as start:
        if start.outcome is not None:
            return start.outcome
        return train_started(start, composed_config, hparams, world)


def train_started(
    start: RunStart,
    composed_config: dict[str, Any],
    hparams: Hparams | None = None,
    world: World = ALONE,
    trial: EpochReport | None = None,
    data: DataSplits | None = None,
    labels: RunLabels | None = None,
) -> dict[str, Any]:
    """Build the run, train and validate every epoch, test the best checkpoint; returns
    results.json's content. ``hparams`` (name -> value) goes to TensorBoard's HPARAMS
    tab with the final metrics; ``world`` is this process's place among the processes
    training together; ``trial`` hears each epoch's validation accuracy where the run is
    a search's trial, and may stop it (TrialPruned); ``data``, the run's splits where
    they were built already (by the range test); ``labels``, how the logger group's
    stores name the run."""
    hparams = hparams or Hparams()
    if labels is not None:  # the config as it runs (optimizer.lr=auto: with lr_found)
        labels = in_folder(replace(labels, params=flat_params(composed_config)), start.run_dir)
    try:
        training = build_training(
            start.run,
            world,
            start.runtime,
            start.run_dir,
            composed_config,
            start.resume,
            data,
            labels,
        )
    except BaseException:
        if data is not None:  # the range test's loader workers would hold the exit
            data.close()
        raise
    try:
        log.info("run folder: %s", start.run_dir)
        fit(training, hparams, trial)
        return test_best(training, hparams, start.started)
    finally:
        training.tracker.close()  # closed already, unless an error nobody expected stopped it
        try:
            if isinstance(training.train_step, ProfiledStep):  # debug=profile: its end
                training.train_step.finish()
        finally:
            training.data.close()


def fit(training: Training, hparams: Hparams, trial: EpochReport | None = None) -> None:
    """Every remaining epoch: train, validate, log, checkpoint; stop early where asked.
    A signal, a diverged run or a pruned trial saves a checkpoint, records why and raises."""
    state, tracker, trainer = training.state, training.tracker, training.run.trainer
    counters = state.counters
    try:
        with GracefulStop() as stop:
            for epoch in range(counters.epoch + 1, trainer.epochs + 1):
                train_stats, state.progress = train_one_epoch(
                    epoch_loop(training, stop),
                    epoch_settings(training, epoch),
                    counters.global_step,
                    state.progress,  # where a run resumed in mid-epoch stopped
                )
                counters.global_step = train_stats.global_step
                if not train_stats.completed:
                    stop_mid_epoch(training, epoch, train_stats)
                val_stats, raw_stats = validate(training)
                state.schedule.after_epoch(epoch, val_stats.accuracy)
                counters.epoch = epoch
                verdict = training.monitor.judge(counters, epoch, val_stats, train_stats.loss)
                record_epoch(training, epoch, train_stats, raw_stats, val_stats, verdict.improved)
                save_checkpoints(training, verdict)
                signal_name = training.world.agree_on_reason(stop.signal_name or "")
                if signal_name and epoch < trainer.epochs:  # arrived in validation or saving
                    raise RunPreempted(
                        f"{signal_name}: stopped after epoch {epoch}; checkpoint saved; "
                        f"continue with trainer.resume={training.run_dir}"
                    )
                last = epoch == trainer.epochs
                if trial is not None and training.world.broadcast(  # rank 0 asks the study
                    trial.should_stop(epoch, val_stats.accuracy, last)
                ):
                    raise TrialPruned(f"after epoch {epoch} (val_acc {val_stats.accuracy:.2f}%)")
                if verdict.stop:  # early stopping, or the training loss's goal (logged)
                    break
    except (TrainingDiverged, TrialPruned, RunPreempted) as err:
        status, reason = how_it_stopped(err)
        tracker.record_failure(status, reason=reason, message=str(err))
        if status != "interrupted":  # a run that will not go on: its row in HPARAMS
            final = {"run/epochs": float(counters.epoch)}
            if counters.best_value is not None:
                final["accuracy/best_val"] = counters.best_val_acc
                final["run/best_monitored"] = counters.best_value
            tracker.log_hparams(hparams, final, succeeded=False, global_step=counters.global_step)
        tracker.close()
        training.world.barrier()  # every process stops here: none exits before the record
        raise


def how_it_stopped(err: Exception) -> tuple[str, str]:
    """failure.json's status and a few words of reason for a run that stopped early."""
    if isinstance(err, TrialPruned):
        return "pruned", err.after
    if isinstance(err, RunPreempted):
        return "interrupted", str(err).split(";", 1)[0]
    return "diverged", str(err).split(":", 1)[0]


def epoch_loop(training: Training, stop: GracefulStop) -> EpochLoop:
    """What the run's epochs train with (the run's objects, for train_one_epoch)."""
    return EpochLoop(
        training.train_step,
        training.data.train,
        training.state.schedule,
        training.tracker.log_step,
        training.state.ema,
        training.world,
        lambda: stop.signal_name or "",
    )


def epoch_settings(training: Training, epoch: int) -> EpochSettings:
    trainer = training.run.trainer
    return EpochSettings(
        log_every_n_steps=trainer.log_every_n_steps,
        on_nonfinite=trainer.on_nonfinite,
        max_consecutive_nonfinite=trainer.max_consecutive_nonfinite,
        accumulate=trainer.accumulate_grad_batches,
        progress_bar=trainer.progress_bar and training.world.is_main,
        label=f"epoch {epoch}/{trainer.epochs}",
    )


def stop_mid_epoch(training: Training, epoch: int, stats: EpochStats) -> None:
    """An epoch cut short by a signal or by non-finite steps: save last.pt and raise."""
    save_checkpoints(training)
    where = f"stopped in epoch {epoch} at step {stats.global_step}"
    if stats.signalled:  # to this process or another
        raise RunPreempted(
            f"{stats.stop_reason}: {where}; checkpoint saved; continue with "
            f"trainer.resume={training.run_dir}"
        )
    raise TrainingDiverged(
        f"{stats.stop_reason}: {where} (trainer.on_nonfinite="
        f"{training.run.trainer.on_nonfinite}); the weights from before that step are in "
        f"{training.checkpoints / 'last.pt'}; lower optimizer.lr or keep clipping=norm"
    )


def validate(training: Training) -> tuple[EvalStats, EvalStats]:
    """The validation of the weights the run keeps, selects by and tests (the average
    with ema=on), and of the last step's weights (the same object without EMA)."""
    world, runtime, data = training.world, training.runtime, training.data
    tta, classes = test_time_augmentation(training.run.data), data.info.num_classes
    step = training.state.counters.global_step
    world.share_batchnorm_statistics(training.model)  # everyone evaluates rank 0's model
    raw_stats = evaluate(training.network, data.val, runtime, tta, world, classes)
    ensure_finite("validation loss", raw_stats.loss, step)
    ema = training.state.ema
    if ema is None:
        return raw_stats, raw_stats
    world.share_batchnorm_statistics(ema.model)
    val_stats = evaluate(ema.model, data.val, runtime, tta, world, classes)
    ensure_finite("validation loss", val_stats.loss, step)
    return val_stats, raw_stats


def record_epoch(
    training: Training,
    epoch: int,
    train_stats: EpochStats,
    raw_stats: EvalStats,
    val_stats: EvalStats,
    improved: bool,
) -> None:
    """metrics.jsonl, TensorBoard, the figures every N epochs and the console line
    (marked where the epoch is the best so far)."""
    state, tracker, run = training.state, training.tracker, training.run
    lr = state.progress.start_lr
    state.progress = None
    steps = -(-len(training.data.train) // run.trainer.accumulate_grad_batches)  # an epoch's
    end = train_stats.global_step
    lr_peak = state.schedule.peak_rate(max(0, end - steps), end) or lr
    ema_stats = None if state.ema is None else val_stats
    tracker.log_epoch(
        epoch,
        lr,
        lr_peak,
        train_stats,
        raw_stats,
        model_health(training.model),
        ema=ema_stats,
        class_names=training.data.info.class_names,
    )
    every = run.diagnostics.figures_every_n_epochs
    if every is not None and (epoch % every == 0 or epoch == run.trainer.epochs):
        log_figures(
            tracker,
            training.model,
            training.data,
            training.criterion,
            training.runtime,
            val_stats,
            epoch,
            state.counters.global_step,
        )
    summary = epoch_summary(
        epoch, run.trainer.epochs, train_stats, raw_stats, lr_peak, ema=ema_stats
    )
    log.info("%s%s", summary, "  (best)" if improved else "")


def save_checkpoints(training: Training, verdict: Verdict | None = None) -> None:
    """last.pt, and what the epoch's ``verdict`` keeps (best.pt, a top-k file), from
    rank 0, holding every process's own state; then the files it pushed out go. The
    others wait, so that no process moves on (or exits) before the files are on disk."""
    saved = training.state.state_dict()  # a collective: every process's position
    folder = training.checkpoints
    kept = None if verdict is None else verdict.kept_file
    if training.world.is_main:
        # kept and best first: last.pt must never name a file that is not on disk
        if kept is not None:
            save_checkpoint(saved, folder / kept)
        if verdict is not None and verdict.improved:  # best.pt: the kept file's twin
            if kept is not None:
                save_checkpoint_copy(folder / kept, folder / "best.pt")
            else:
                save_checkpoint(saved, folder / "best.pt")
        save_checkpoint(saved, folder / "last.pt")
        for name in verdict.pushed_out if verdict is not None else []:
            (folder / name).unlink(missing_ok=True)
        training.tracker.commit()  # the stores send what last.pt now covers
    training.world.barrier()


def test_best(training: Training, hparams: Hparams, started: float) -> dict[str, Any]:
    """Test the best checkpoint's weights; write results.json and the final metrics."""
    counters, ema, tracker = training.state.counters, training.state.ema, training.tracker
    best_path = training.checkpoints / "best.pt"
    best = load_checkpoint(best_path)
    load_model_weights(training.model, best, best_path)  # `network` shares them
    if ema is not None:
        ema.load_state_dict(best["ema"])
    tested = training.network if ema is None else ema.model
    data, tta = training.data, test_time_augmentation(training.run.data)
    test_stats = evaluate(
        tested, data.test, training.runtime, tta, training.world, data.info.num_classes
    )
    monitor = training.monitor
    results = {
        "best_val_acc": counters.best_val_acc,  # best.pt's
        "best_epoch": counters.best_epoch,
        "monitor": monitor.name,
        f"best_{monitor.name}": counters.best_value,
        "test_acc": test_stats.accuracy,
        "test_loss": test_stats.loss,
        "epochs": counters.epoch,
        "global_step": counters.global_step,
        "wall_s": time.perf_counter() - started,
        "device": str(training.runtime.device),
        "precision": training.runtime.precision.name,
        "weights": "raw" if ema is None else "ema",  # which weights were tested
        "processes": training.world.size,
        **test_stats.summary("test", data.info.class_names),
    }
    if monitor.top_k > 1 and training.run.trainer.keep_checkpoints:
        results["kept_checkpoints"] = [entry["file"] for entry in counters.kept]
    tracker.log_results(results, counters.global_step)
    final = {
        "accuracy/best_val": results["best_val_acc"],
        "run/best_monitored": counters.best_value,
        "run/wall_s": results["wall_s"],
        "run/epochs": float(results["epochs"]),
    }
    tracker.log_hparams(hparams, final, succeeded=True, global_step=counters.global_step)
    tracker.close()
    log.info(
        "test of best checkpoint (epoch %d, %s %.4g): test_acc %.2f%%  test_loss %.4f  "
        "(%.0fs in all)",
        counters.best_epoch,
        monitor.name,
        counters.best_value,
        test_stats.accuracy,
        test_stats.loss,
        results["wall_s"],
    )
    if not training.run.trainer.keep_checkpoints and training.world.is_main:
        shutil.rmtree(training.checkpoints, ignore_errors=True)
        log.info("checkpoints deleted (trainer.keep_checkpoints=false)")
    return results
