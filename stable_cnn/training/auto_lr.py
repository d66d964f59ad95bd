"""``optimizer.lr=auto``: the learning-rate range test (lr_finder.py) run before the run
is built, on the run's own data, sized to it, and its suggestion the run's rate; a
resumed run takes the rate its checkpoint recorded instead of searching again."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from stable_cnn.config import RunConfig
from stable_cnn.config.lr_find import LRFindConfig
from stable_cnn.data.splits import DataSplits
from stable_cnn.state.checkpoint import CheckpointError
from stable_cnn.state.record import CheckpointRecord
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import Runtime
from stable_cnn.system.seeding import seed_everything
from stable_cnn.system.signals import GracefulStop
from stable_cnn.training.build import build_data
from stable_cnn.training.fit import RunPreempted, RunStart
from stable_cnn.training.lr_finder import find_learning_rate

log = logging.getLogger("stable_cnn")


def with_auto_lr(
    start: RunStart, composed_config: dict, world: World = ALONE
) -> tuple[RunStart, DataSplits | None]:
    """optimizer.lr=auto, before the run is built: the run with the rate the range test
    finds (a resumed run: the one it found when it started), and the data the test
    decoded, for the run itself. A signal during the search: RunPreempted (exit 75,
    nothing to save)."""
    run = start.run
    resume_state = None if start.resume is None else start.resume[1]
    data = build_data(run, world, start.runtime) if resume_state is None else None
    try:
        with GracefulStop() as stop:
            found = with_found_lr(
                run,
                start.runtime,
                start.run_dir,
                resume_state,
                composed_config,
                world,
                lambda: stop.signal_name or "",
                data,
            )
        if found is None:
            raise RunPreempted(
                f"{stop.signal_name}: stopped while finding the learning rate "
                "(optimizer.lr=auto); nothing to save: run the command again"
            )
    except BaseException:
        if data is not None:  # its loader workers would hold the process at exit
            data.close()
        raise
    return replace(start, run=found), data


def with_found_lr(
    run: RunConfig,
    runtime: Runtime,
    run_dir: Path,
    resume_state: dict | None,
    composed_config: dict,
    world: World = ALONE,
    stop_requested: Callable[[], str] = lambda: "",
    data: DataSplits | None = None,
) -> RunConfig | None:
    """``optimizer.lr=auto``: the run with the value it found when it started (a resumed
    run goes on with it), else with the range test's suggestion, found now (its files in
    ``run_dir``/lr_find/); None if a signal stopped the search. The checkpoint's copy
    of the run's config records the value as ``optimizer.lr_found``. ``data``: the run's
    own, which the range test then uses (and leaves at its start) instead of its own."""
    if resume_state is not None:
        found = CheckpointRecord.read(resume_state, run_dir).config["optimizer"].get("lr_found")
        if found is None:
            raise CheckpointError(
                "optimizer.lr=auto: the checkpoint holds no learning rate found by the range "
                "test; resume with the optimizer.lr the run started with"
            )
        log.info("optimizer.lr=auto: %.4g, found when the run started", found)
    else:
        settings = sized_to_the_data(LRFindConfig(), data, run.trainer.accumulate_grad_batches)
        finding = find_learning_rate(
            run, runtime, settings, run_dir / "lr_find", world, stop_requested, data
        )
        if finding is None:
            return None
        found = finding.suggested_lr
        # From the same seeds again: the run starts with the initial weights, data order
        # and dropout masks it would have had with optimizer.lr given by hand.
        seed_everything(run.trainer.seed, run.trainer.deterministic)
        log.info(
            "optimizer.lr=auto: %.4g (the range test's suggestion; its curve: %s)",
            found,
            run_dir / "lr_find" / "lr_find.png",
        )
    composed_config["optimizer"]["lr_found"] = found
    return replace(run, optimizer=replace(run.optimizer, lr=found))


def sized_to_the_data(
    settings: LRFindConfig, data: DataSplits | None, accumulate: int
) -> LRFindConfig:
    """The range test of optimizer.lr=auto no longer than one epoch of the run's data
    where that is shorter (a small folder would train for many epochs before its run
    began), and never shorter than the 20 steps a curve needs; logged."""
    if data is None:
        return settings
    epoch_steps = len(data.train) // accumulate
    steps = max(MIN_STEPS, min(settings.num_steps, epoch_steps))
    if steps < settings.num_steps:
        log.info(
            "optimizer.lr=auto: a range test of %d steps (one epoch of this data is %d; "
            "stable-cnn-lr-find lr_find.num_steps=N runs a longer one)",
            steps,
            epoch_steps,
        )
    return replace(settings, num_steps=steps)


MIN_STEPS = 20  # lr_find.num_steps' least: fewer points make no curve to read
