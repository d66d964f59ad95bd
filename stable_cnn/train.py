"""The Hydra entrypoint, ``stable-cnn-train``: the only module that sees the DictConfig.

A run reads top to bottom: compose config -> build data -> build model -> build
optimizer, schedule, scaler -> for each epoch: train, validate, log, checkpoint ->
test the best checkpoint -> return the best validation accuracy (for sweepers).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException
from torch import nn

from stable_cnn.checkpoint import load_checkpoint, load_model_weights, save_checkpoint
from stable_cnn.config import RunConfig, register_schemas
from stable_cnn.data import DatasetInfo, build_splits
from stable_cnn.engine import (
    EpochProgress,
    EpochStats,
    EvalStats,
    TrainingDiverged,
    ensure_finite,
    evaluate,
    train_one_epoch,
)
from stable_cnn.errors import ConfigError, UserError
from stable_cnn.hardware import (
    Runtime,
    choose_memory_format,
    choose_precision,
    compile_model,
    describe_cpu,
    resolve_device,
)
from stable_cnn.models import SmallCNN
from stable_cnn.optimizers import build_optimizer
from stable_cnn.preemption import EXIT_PREEMPTED, GracefulStop
from stable_cnn.resume import (
    check_same_config,
    check_same_device,
    find_checkpoint,
    holds_a_run,
    is_finished,
    restore_rng,
    rng_state,
)
from stable_cnn.schedulers import build_schedule
from stable_cnn.tracking import RunTracker

log = logging.getLogger("stable_cnn")


def config_dir() -> str:
    """conf/ at the repository root (source checkout, editable install), else the copy
    shipped inside the package (``pip install .``)."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {package}: reinstall stable-cnn")


def parse_run_config(cfg: DictConfig) -> RunConfig:
    """The composed config as typed objects; range checks run here, before any data."""
    try:
        groups = {name: OmegaConf.to_object(cfg[name]) for name in RunConfig.__dataclass_fields__}
    except MissingMandatoryValue as err:  # a key left as ??? in the YAML
        raise ConfigError(
            f"{err.full_key} is required here and has no value: add {err.full_key}=... "
            f"to the command line"
        ) from None
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "config"
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from None
    return RunConfig(**groups)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: the few CUDA kernels without a deterministic version warn, not crash.
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        torch.use_deterministic_algorithms(False)  # a multirun's jobs share the process
    # cuDNN autotuning picks kernels by timing, so it is off when runs must repeat exactly.
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()


def build_model(run: RunConfig, info: DatasetInfo) -> SmallCNN:
    return SmallCNN(
        in_channels=info.in_channels,
        num_classes=info.num_classes,
        width=run.model.width,
        dropout=run.model.dropout,
        head_dropout=run.model.head_dropout,
        hidden=run.model.hidden,
        batchnorm=run.model.batchnorm,
    )


def model_config(run: RunConfig, info: DatasetInfo) -> dict[str, Any]:
    """What it takes to rebuild the model from a checkpoint."""
    return {"in_channels": info.in_channels, "num_classes": info.num_classes, **asdict(run.model)}


def epoch_summary(epoch: int, epochs: int, train: EpochStats, val: EvalStats, lr: float) -> str:
    return (
        f"epoch {epoch}/{epochs}  train_loss {train.loss:.4f}  val_loss {val.loss:.4f}  "
        f"val_acc {val.accuracy:.2f}%  lr {lr:.3g}  {train.images_per_second:,.0f} img/s  "
        f"{train.seconds:.1f}s"
    )


def choose_runtime(run: RunConfig) -> Runtime:
    """Device, precision and memory layout for this run; logs what it chose and why."""
    if run.trainer.num_threads is not None:
        torch.set_num_threads(run.trainer.num_threads)
    device = resolve_device(run.trainer.device)
    precision = choose_precision(run.amp.name, device)
    memory_format = choose_memory_format(device, run.trainer.channels_last)
    if device.type == "cpu":
        log.info("device cpu, %d threads, CPU %s", torch.get_num_threads(), describe_cpu())
    else:
        log.info("device %s", device)
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    log.info("precision %s (%s), %s layout", precision.name, precision.reason, layout)
    return Runtime(device, precision, memory_format)


class RunPreempted(Exception):
    """A signal stopped the run after it saved a resumable checkpoint."""


@dataclass
class Counters:
    """Where the run stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    global_step: int = 0
    best_val_acc: float = -1.0
    best_epoch: int = 0


def train(
    run: RunConfig, run_dir: Path, composed_config: dict[str, Any], outputs: Path = Path("outputs")
) -> dict[str, Any]:
    """Train, validate every epoch, test the best checkpoint; returns results.json's content."""
    started = time.perf_counter()
    trainer = run.trainer
    resume_from = find_checkpoint(trainer.resume, run_dir, outputs, composed_config)
    resume_state = None if resume_from is None else load_checkpoint(resume_from)
    if resume_state is not None:
        check_same_config(resume_state, composed_config, resume_from)
    if resume_from is not None and resume_from.parent.name == "checkpoints":
        run_dir = resume_from.parent.parent  # a resumed run keeps writing where it started
        if is_finished(run_dir):
            log.info("run %s already finished: nothing to resume", run_dir)
            return json.loads((run_dir / "results.json").read_text())
    elif holds_a_run(run_dir):
        raise UserError(
            f"run folder {run_dir} already holds a run: continue it with trainer.resume=auto, "
            f"or choose another hydra.run.dir"
        )
    log.info("run folder: %s", run_dir)
    seed_everything(trainer.seed, trainer.deterministic)
    runtime = choose_runtime(run)

    data = build_splits(run.data, runtime.device, trainer.seed)
    log.info(
        "data %s: %d train / %d val / %d test images, batch %d",
        data.info.name, data.num_train, data.num_val, data.num_test, run.data.batch_size,
    )  # fmt: skip
    if data.val_is_test:
        log.warning("validating on the test set (data.val_size=0): test accuracy is optimistic")

    model = build_model(run, data.info).to(runtime.device, memory_format=runtime.memory_format)
    log.info(
        "model SmallCNN width %d: %.2fM parameters",
        run.model.width, sum(p.numel() for p in model.parameters()) / 1e6,
    )  # fmt: skip
    # Train and evaluate through `network` (compiled or not); save `model`'s plain state_dict.
    network = compile_model(model, runtime.device) if trainer.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=trainer.label_smoothing)
    optimizer = build_optimizer(model, run.optimizer)
    schedule = build_schedule(optimizer, run.scheduler, trainer.epochs, len(data.train))
    # One GradScaler for the whole run: its loss scale is calibrated over many steps.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler)

    counters, progress = Counters(), None
    if resume_state is not None:
        check_same_device(resume_state, runtime.device, resume_from)
        load_model_weights(model, resume_state, resume_from)
        for part, key in ((optimizer, "optimizer"), (schedule, "scheduler"), (scaler, "scaler"),
                          (data.train, "data")):  # fmt: skip
            part.load_state_dict(resume_state[key])
        restore_rng(resume_state["rng"])
        counters = Counters(**resume_state["counters"])
        if resume_state["progress"] is not None:
            progress = EpochProgress.from_state(resume_state["progress"], runtime.device)
        where = f"mid-epoch {counters.epoch + 1}" if progress else f"after epoch {counters.epoch}"
        log.info("resuming from %s (%s, step %d)", resume_from, where, counters.global_step)

    def checkpoint(progress: EpochProgress | None) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": schedule.state_dict(),
            "scaler": scaler.state_dict(),
            "counters": asdict(counters),
            "progress": None if progress is None else progress.state_dict(),
            "data": data.train.state_dict(),
            "rng": rng_state(),
            "model_config": model_config(run, data.info),
            "config": composed_config,
            "device_type": runtime.device.type,
        }

    tracker = RunTracker(run_dir, resume_step=counters.global_step, epochs_done=counters.epoch)
    checkpoints = run_dir / "checkpoints"
    with GracefulStop() as stop:
        for epoch in range(counters.epoch + 1, trainer.epochs + 1):
            train_stats, progress = train_one_epoch(
                network, data.train, criterion, optimizer, scaler, schedule, run.clipping,
                runtime, counters.global_step, trainer.log_every_n_steps, tracker.log_step,
                progress_label=f"epoch {epoch}/{trainer.epochs}",
                progress_bar=trainer.progress_bar, progress=progress,
                stop_requested=lambda: stop.signal_name or "",
                on_nonfinite=trainer.on_nonfinite,
                max_consecutive_nonfinite=trainer.max_consecutive_nonfinite,
            )  # fmt: skip
            counters.global_step = train_stats.global_step
            if not train_stats.completed:
                save_checkpoint(checkpoint(progress), checkpoints / "last.pt")
                tracker.close()
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
            lr, progress = progress.start_lr, None
            val_stats = evaluate(network, data.val, runtime)
            ensure_finite("validation loss", val_stats.loss, counters.global_step)
            schedule.after_epoch(val_stats.accuracy)
            counters.epoch = epoch

            tracker.log_epoch(epoch, lr, train_stats, val_stats)
            improved = val_stats.accuracy > counters.best_val_acc
            summary = epoch_summary(epoch, trainer.epochs, train_stats, val_stats, lr)
            log.info("%s%s", summary, "  (best)" if improved else "")
            if improved:
                counters.best_val_acc, counters.best_epoch = val_stats.accuracy, epoch
            state = checkpoint(None)
            if improved:  # best.pt first: last.pt must never name a best that is not on disk
                save_checkpoint(state, checkpoints / "best.pt")
            save_checkpoint(state, checkpoints / "last.pt")
            if stop.requested and epoch < trainer.epochs:  # arrived during validation or saving
                tracker.close()
                raise RunPreempted(
                    f"{stop.signal_name}: stopped after epoch {epoch}; checkpoint saved; "
                    f"continue with trainer.resume={run_dir}"
                )
            patience = trainer.early_stopping_patience
            if patience is not None and epoch - counters.best_epoch >= patience:
                log.info("early stopping: no better val_acc for %d epochs", patience)
                break

    best_path = checkpoints / "best.pt"
    load_model_weights(model, load_checkpoint(best_path), best_path)  # `network` shares them
    test_stats = evaluate(network, data.test, runtime)
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
    }
    tracker.log_results(results, counters.global_step)
    tracker.close()
    log.info(
        "test of best checkpoint (epoch %d): test_acc %.2f%%  test_loss %.4f  (%.0fs in all)",
        counters.best_epoch, test_stats.accuracy, test_stats.loss, results["wall_s"],
    )  # fmt: skip
    return results


register_schemas()


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose, train, and return the best validation accuracy (what sweepers maximise)."""
    try:
        run = parse_run_config(cfg)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        results = train(run, run_dir, OmegaConf.to_container(cfg, resolve=True))
    except UserError as err:
        log.error("error: %s", err)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweep records this job as failed and runs the others
        sys.exit(err.exit_code)
    except RunPreempted as stopped:
        log.warning("%s", stopped)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(EXIT_PREEMPTED)
    return results["best_val_acc"]


def output_folder_problem(args: list[str]) -> str:
    """Why the run folder cannot be created, or ''. Hydra creates it before ``main`` runs
    and would answer with a traceback, so the console entry checks first."""
    folders = [arg.split("=", 1)[1] for arg in args
               if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]  # fmt: skip
    for folder in folders or ["outputs"]:
        existing = Path(folder).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        why = "is a file" if not existing.is_dir() else ""
        why = why or ("is not writable" if not os.access(existing, os.W_OK) else "")
        if why:
            return f"cannot create the run folder {folder}: {existing} {why}; set hydra.run.dir"
    return ""


def cli() -> None:
    """The console entry point: pre-flight checks with one-line errors, then ``main``."""
    problem = output_folder_problem(sys.argv[1:])
    if problem:
        print(f"stable-cnn-train: error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
