"""The trainer group (conf/trainer/): epochs, device, seed, resume, logging, processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stable_cnn.config.checks import check, check_choice


@dataclass
class TrainerConfig:
    epochs: int = 5
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    seed: int = 0
    deterministic: bool = False  # deterministic kernels: reproducible, sometimes slower
    log_every_n_steps: int = 50  # TensorBoard step scalars and progress-bar loss interval
    early_stopping_patience: int | None = None  # stop after N epochs without a better val acc
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
