"""One run, one folder: the folder Hydra makes for a command is removed when it ends
without a run of its own (refused, or continued in the run it resumed), a resumed run's
log goes on in its own folder, and the processes that torchrun starts share one folder."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from stable_cnn.state.run_files import holds_a_record

if TYPE_CHECKING:  # the process-group module needs torch: imported where it is used
    from stable_cnn.system.distributed import World


def discard_if_unused(folder: Path) -> None:
    """Remove ``folder`` (Hydra's .hydra/ and train.log) when it holds no run, and the
    empty folders above it up to the current one (outputs/<date>/ of a refused run)."""
    if holds_a_record(folder) or not folder.is_dir():
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(
            folder.resolve()
        ):
            handler.close()  # its file is about to go
    shutil.rmtree(folder, ignore_errors=True)
    here = Path.cwd().resolve()
    parent = folder.resolve().parent
    while parent != here and parent.is_relative_to(here) and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def continue_log_in(run_dir: Path, hydra_folder: Path, world: World | None = None) -> None:
    """The command goes on in another run's folder (a resume): its log moves there,
    after what it logged so far, and goes on in that run's train.log (``world``: the
    processes of the run, of which the first moves the log; None: this one alone)."""
    is_main = world is None or world.is_main
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        old = Path(handler.baseFilename)
        if not old.is_relative_to(hydra_folder.resolve()):
            continue
        handler.flush()
        new = run_dir / old.name
        if is_main and old.is_file():
            with new.open("a") as log_file:
                log_file.write(old.read_text())
        replacement = logging.FileHandler(new, mode="a")
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        root.addHandler(replacement)
        root.removeHandler(handler)
        handler.close()


class SharedRunFolder(Callback):
    """Hydra callback (conf/config.yaml, hydra.callbacks): the processes that torchrun
    starts each compose the config, and each would resolve ``${now:...}`` in its own
    second. Before Hydra creates the run folder, they join the process group and take
    rank 0's folder, so that one run has one folder (with or without hydra.run.dir)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from stable_cnn.system.distributed import join, world_from_environment

        world = world_from_environment()
        if world.distributed:
            join(world)
            agreed = world.broadcast(str(config.hydra.run.dir))
            with open_dict(config):
                config.hydra.run.dir = agreed
                if not world.is_main:  # rank 0 writes .hydra/ (the same config)
                    config.hydra.output_subdir = None


def output_folder_problem(args: list[str]) -> str:
    """Why the run folder cannot be created, or ''. Hydra creates it before ``main`` runs
    and would answer with a traceback, so the console entry checks first."""
    folders = [
        arg.split("=", 1)[1]
        for arg in args
        if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir="))
    ]
    for folder in folders or ["outputs"]:
        existing = Path(folder).expanduser().absolute()
        while not existing.exists():
            existing = existing.parent
        why = "is a file" if not existing.is_dir() else ""
        why = why or ("is not writable" if not os.access(existing, os.W_OK) else "")
        if why:
            return f"cannot create the run folder {folder}: {existing} {why}; set hydra.run.dir"
    return ""
