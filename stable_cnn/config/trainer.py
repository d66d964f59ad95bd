"""The trainer group (conf/trainer/): epochs, device, seed, resume, logging, processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stable_cnn.config.checks import check, check_choice

# What trainer.monitor may name, and which way is better for each.
MONITORED = {"val_acc": "max", "val_loss": "min", "val_f1": "max", "val_top5": "max"}


@dataclass
class TrainerConfig:
    epochs: int = 5
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False  # deterministic kernels: reproducible, sometimes slower
    log_every_n_steps: int = 50  # TensorBoard step scalars and progress-bar loss interval
    # the validation metric that picks best.pt, the kept checkpoints and early stopping,
    # measured on the weights the run tests (the average's with ema=on)
    monitor: str = "val_acc"  # val_acc | val_loss | val_f1 | val_top5 (more than 5 classes)
    monitor_mode: str | None = None  # max | min; null = from the name (min for a loss)
    save_top_k: int = 1  # keep the k best checkpoints (best.pt is the first); 1 = best.pt alone
    early_stopping_patience: int | None = None  # stop after N epochs without a better monitor
    early_stopping_min_delta: float = 0.0  # better means better by more than this
    stop_at_train_loss: float | None = None  # stop once an epoch's training loss is below this
    keep_checkpoints: bool = True  # false: delete checkpoints/ once the run has tested best.pt
    label_smoothing: float = 0.1
    # the training loss's weight per class: null (all 1) | balanced (N / (classes x the
    # class's training images), from the training labels) | a list, one per class
    class_weights: Any = None
    channels_last: bool | None = None  # null = where it is faster (CUDA, AVX-512 CPUs)
    tf32: bool = True  # CUDA (Ampere+): fp32 matmuls and convolutions on TF32 tensor cores
    progress_bar: bool = True  # shown only on a terminal
    compile: bool = False  # torch.compile the model (falls back to eager with a warning)
    cuda_graph: bool = False  # capture the whole step in a CUDA graph (CUDA, bf16/fp32)
    num_threads: int | None = None  # CPU threads for torch; null = torch's default (one per core)
    resume: str | None = None  # null = fresh; auto; or a checkpoint file / run folder to continue
    on_nonfinite: str = "skip"  # NaN/Inf loss or gradient: skip the step, or stop (and save)
    max_consecutive_nonfinite: int = 10  # with skip: stop after this many skipped in a row
    devices: int = 1  # >1: start this many training processes here (DDP, one per GPU)
    accumulate_grad_batches: int = 1  # batches whose gradients make one optimizer step

    def __post_init__(self) -> None:
        check(self.epochs >= 1, "trainer.epochs", self.epochs, "must be >= 1")
        check(
            self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:"),
            "trainer.device",
            self.device,
            "use auto, cpu, cuda, cuda:N or mps",
        )
        check(
            self.log_every_n_steps >= 1,
            "trainer.log_every_n_steps",
            self.log_every_n_steps,
            "must be >= 1",
        )
        check(
            self.early_stopping_patience is None or self.early_stopping_patience >= 1,
            "trainer.early_stopping_patience",
            self.early_stopping_patience,
            "must be null or >= 1",
        )
        check_choice("trainer.monitor", self.monitor, tuple(MONITORED))
        if self.monitor_mode is not None:
            check_choice("trainer.monitor_mode", self.monitor_mode, ("max", "min"))
        check(self.save_top_k >= 1, "trainer.save_top_k", self.save_top_k, "must be >= 1")
        check(
            self.early_stopping_min_delta >= 0,
            "trainer.early_stopping_min_delta",
            self.early_stopping_min_delta,
            "must be >= 0 (in the monitor's unit: percent for accuracies)",
        )
        check(
            self.stop_at_train_loss is None or self.stop_at_train_loss > 0,
            "trainer.stop_at_train_loss",
            self.stop_at_train_loss,
            "must be null or > 0",
        )
        check_choice("trainer.on_nonfinite", self.on_nonfinite, ("skip", "stop"))
        check(
            self.max_consecutive_nonfinite >= 1,
            "trainer.max_consecutive_nonfinite",
            self.max_consecutive_nonfinite,
            "must be >= 1",
        )
        check(self.devices >= 1, "trainer.devices", self.devices, "must be >= 1")
        check(
            self.accumulate_grad_batches >= 1,
            "trainer.accumulate_grad_batches",
            self.accumulate_grad_batches,
            "must be >= 1",
        )
        check(
            self.num_threads is None or self.num_threads >= 1,
            "trainer.num_threads",
            self.num_threads,
            "must be null or >= 1",
        )
        weights = self.class_weights
        check(
            weights is None
            or weights == "balanced"
            or (
                isinstance(weights, list | tuple)
                and len(weights) >= 2
                and all(isinstance(w, int | float) and w > 0 for w in weights)
            ),
            "trainer.class_weights",
            weights,
            "must be null, balanced, or a list of positive numbers, one per class",
        )
        check(
            0 <= self.label_smoothing < 1,
            "trainer.label_smoothing",
            self.label_smoothing,
            "must be in [0, 1)",
        )

    @property
    def monitor_direction(self) -> str:
        """max or min: trainer.monitor_mode, or the monitor's own way."""
        return self.monitor_mode or MONITORED[self.monitor]
