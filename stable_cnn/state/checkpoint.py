"""Checkpoints that are never half-written, and loading that explains what is wrong.

Saving goes through ``atomic_write`` (temporary file, fsync, rename), so a crash
mid-save leaves the previous checkpoint intact. Loading uses ``weights_only=True``:
no arbitrary pickles.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.errors import UserError
from stable_cnn.system.atomic import atomic_write, fsync_folder, host_name, remove_stale_partials

FORMAT = "stable-cnn/2"  # 2: the epoch's sums in one tensor, the resolved runtime recorded
READABLE_FORMATS = ("stable-cnn/1", FORMAT)  # what eval and export can still load


class CheckpointError(UserError):
    """A checkpoint that is missing, corrupt, foreign or for another model."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Atomically write ``state`` (plus a format tag) to ``path``; a failed write (a full
    disk) leaves the previous checkpoint in place and says so."""
    try:
        with atomic_write(path) as out:
            torch.save({"format": FORMAT, **state}, out)
    except (OSError, RuntimeError) as err:  # torch.save wraps some write errors
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise CheckpointError(
            f"could not write checkpoint {path} ({reason}): free disk space or set "
            f"hydra.run.dir elsewhere; the previous checkpoint there is intact"
        ) from None


def save_checkpoint_copy(source: Path, path: Path) -> None:
    """``path`` atomically becomes the checkpoint ``source``: a hard link where the file
    system has them, so the same weights do not take the disk twice, else a copy."""
    partial = path.with_name(f".{path.name}.{host_name()}.{os.getpid()}.partial")
    try:
        remove_stale_partials(path)
        partial.unlink(missing_ok=True)
        try:
            os.link(source, partial)
        except OSError:  # no hard links here (some network and FAT file systems)
            with atomic_write(path) as out, source.open("rb") as copied:
                shutil.copyfileobj(copied, out)
            return
        os.replace(partial, path)
        fsync_folder(path.parent)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise CheckpointError(
            f"could not write checkpoint {path} ({err.strerror or err}): free disk space "
            f"or set hydra.run.dir elsewhere; the previous checkpoint there is intact"
        ) from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint to the CPU; every failure is one CheckpointError line."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or not a PyTorch file ({reason[:200]}): "
            f"use another checkpoint (best.pt or last.pt of the run)"
        ) from None
    if not isinstance(state, dict) or state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{path} is not a stable-cnn checkpoint (no {FORMAT!r} format tag): "
            f"pass a checkpoints/last.pt or best.pt written by stable-cnn-train"
        )
    return state


def check_resumable(state: dict[str, Any], path: Path) -> None:
    """A run continues only from a checkpoint of this version's format: older ones lack
    what exact resume needs now (the resolved precision, the epoch's sums as one tensor)."""
    if state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path} was written by an older stable-cnn ({state.get('format')}): "
            f"its weights still load in stable-cnn-eval, but a run continues only from a "
            f"{FORMAT} checkpoint: start a new run"
        )


def load_model_weights(model: nn.Module, state: dict[str, Any], path: Path) -> None:
    """Load the model weights, naming the architecture mismatch if they don't fit."""
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        saved = state.get("model_config", {})
        detail = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise CheckpointError(
            f"checkpoint {path} holds a different model ({saved or 'unknown config'}): "
            f"{detail[:160]}; build the same model (e.g. its model.width) to load it"
        ) from None
