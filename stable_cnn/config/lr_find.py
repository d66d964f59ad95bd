"""The learning-rate range test's settings (``lr_find.*`` of ``stable-cnn-lr-find``;
``optimizer.lr=auto`` on ``stable-cnn-train`` runs it with these defaults)."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check


@dataclass
class LRFindConfig:
    min_lr: float = 1e-4  # the sweep's first learning rate
    max_lr: float = 10.0  # its last, if the loss has not diverged before
    num_steps: int = 300  # optimizer steps from min_lr to max_lr, spaced exponentially
    diverge_factor: float = 4.0  # stop once the smoothed loss exceeds this x its minimum

    def __post_init__(self) -> None:
        check(self.min_lr > 0, "lr_find.min_lr", self.min_lr, "must be > 0")
        check(
            self.max_lr > self.min_lr * 10,
            "lr_find.max_lr",
            self.max_lr,
            f"must be more than 10 x lr_find.min_lr ({self.min_lr})",
        )
        check(self.num_steps >= 20, "lr_find.num_steps", self.num_steps, "must be >= 20")
        check(self.diverge_factor > 1, "lr_find.diverge_factor", self.diverge_factor, "must be > 1")
