"""The diagnostics group (conf/diagnostics/): loss spikes and figures in TensorBoard."""

from __future__ import annotations

from dataclasses import dataclass

from stable_cnn.config.checks import check


@dataclass
class DiagnosticsConfig:
    loss_spike_factor: float = 2.0  # a step whose loss exceeds this x the running mean is a spike
    figures_every_n_epochs: int | None = 5  # histograms, image grid, confusion matrix; null: never
    # torch.profiler: trace this many training steps (after one skipped and one warm-up)
    # into <run folder>/profile/; null: no profiling (debug=profile sets 5)
    profile_steps: int | None = None

    def __post_init__(self) -> None:
        check(
            self.loss_spike_factor > 1,
            "diagnostics.loss_spike_factor",
            self.loss_spike_factor,
            "must be > 1",
        )
        check(
            self.figures_every_n_epochs is None or self.figures_every_n_epochs >= 1,
            "diagnostics.figures_every_n_epochs",
            self.figures_every_n_epochs,
            "must be null (never) or >= 1",
        )
        check(
            self.profile_steps is None or self.profile_steps >= 1,
            "diagnostics.profile_steps",
            self.profile_steps,
            "must be null (no profiling) or >= 1",
        )
