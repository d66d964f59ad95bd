"""diagnostics.profile_steps (debug=profile): a torch.profiler trace of a few training
steps, wrapped around the step the run trains with (plain or CUDA graph), written as a
Chrome trace (``<run folder>/profile/rank0.<time>.pt.trace.json``) that Perfetto
(https://ui.perfetto.dev) and chrome://tracing open, with a summary table in the log.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from stable_cnn.state.progress import EpochProgress
from stable_cnn.training.captured_step import GraphedTrainStep
from stable_cnn.training.step import Batch, StepOutcome, TrainStep

log = logging.getLogger("stable_cnn")

SKIPPED, WARM_UP = 1, 1  # steps before the trace: the first builds caches and plans
TABLE_ROWS = 15


class ProfiledStep:
    """``step``, with torch.profiler recording ``steps`` of its calls (after SKIPPED and
    WARM_UP); ``finish`` ends the profiler (writing what it holds) and logs a table."""

    def __init__(self, step: TrainStep | GraphedTrainStep, folder: Path, steps: int, rank: int):
        self.step = step
        self.model, self.runtime = step.model, step.runtime
        self.optimizer, self.scaler = step.optimizer, step.scaler
        self.folder = folder
        self.trace: Path | None = None  # the file this profiler wrote
        write_trace = torch.profiler.tensorboard_trace_handler(
            str(folder), worker_name=f"rank{rank}"
        )

        def on_trace_ready(profiler: profile) -> None:
            before = set(folder.glob("*.pt.trace.json"))
            write_trace(profiler)
            self.trace = max(set(folder.glob("*.pt.trace.json")) - before, default=None)

        activities = [ProfilerActivity.CPU]
        if step.runtime.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        else:  # kineto's "gpuGetDeviceCount failed" where no GPU is meant: noise
            os.environ.setdefault("KINETO_LOG_LEVEL", "5")
        self.profiler = profile(
            activities=activities,
            schedule=schedule(wait=SKIPPED, warmup=WARM_UP, active=steps, repeat=1),
            on_trace_ready=on_trace_ready,
            record_shapes=True,
        )
        self.profiler.start()
        self.finished = False

    def run(self, batches: list[Batch], progress: EpochProgress) -> StepOutcome:
        with record_function("train_step"):
            outcome = self.step.run(batches, progress)
        self.profiler.step()
        return outcome

    def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        self.profiler.stop()  # a trace cut short by a short run is written here
        if self.trace is None:
            log.warning("no profiler trace: the run ended before step %d", SKIPPED + WARM_UP + 1)
            return
        key = (
            "self_cuda_time_total" if self.runtime.device.type == "cuda" else "self_cpu_time_total"
        )
        table = self.profiler.key_averages().table(sort_by=key, row_limit=TABLE_ROWS)
        log.info("profile of the traced steps, by %s:\n%s", key, table)
        log.info("profiler trace: %s (open it in https://ui.perfetto.dev)", self.trace)
