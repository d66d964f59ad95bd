"""Where a run writes, which checkpoint it continues from and whether that is allowed, and
the random state that makes the continuation exact."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from stable_cnn.config import DataConfig
from stable_cnn.errors import TrainingDiverged, UserError
from stable_cnn.state.checkpoint import CheckpointError, check_resumable, load_checkpoint
from stable_cnn.state.record import CheckpointRecord, amp_option
from stable_cnn.state.run_files import (
    has_diverged,
    holds_a_run,
    is_finished,
    read_failure,
    was_pruned,
)
from stable_cnn.state.run_lock import describe_holder, lock_holder
from stable_cnn.system.hardware import Runtime

log = logging.getLogger(__name__)

# Keys of the composed config that may differ between a run and its continuation: they
# change neither the numbers nor the shape of the run.
IGNORED_KEYS = {
    ("trainer", "resume"),
    # Resolved per machine; the resolved precision and layout are compared instead
    # (check_same_runtime), so these may be set to force what the run started with.
    ("amp", "name"),
    ("trainer", "channels_last"),
    ("trainer", "progress_bar"),
    ("trainer", "num_threads"),
    ("data", "root"),
    ("data", "download"),
    ("data", "system_dir"),
    ("data", "num_workers"),
    # The number of processes is checked as such (check_same_world): torchrun's and
    # trainer.devices=N's runs of the same world continue each other.
    ("trainer", "devices"),
    # optimizer.lr=auto's value, found when the run started; a resume takes it from the
    # checkpoint (training/auto_lr.py), so the config asks for auto both times.
    ("optimizer", "lr_found"),
    # How limits and the hold-out pick images: a resume takes the checkpoint's (runs
    # before the key existed took the first N), so it trains on the images it started on.
    ("data", "sampling"),
    # What a run keeps and whether it profiles change nothing it computes.
    ("trainer", "keep_checkpoints"),
    ("diagnostics", "profile_steps"),
}


# Groups a resumed run may change as it likes: where it reports (a store added or
# dropped on resume changes nothing the run computes).
IGNORED_GROUPS = {"logger"}


# Keys added since checkpoints began recording the config, with the value that an older
# checkpoint's run had in effect: a run written before a key existed still resumes.
# data=image_folder's mean and std before they were computed from the images
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
ADDED_KEYS = {
    ("model", "sync_batchnorm"): False,
    ("trainer", "accumulate_grad_batches"): 1,
    ("data", "mixup_alpha"): 0.0,
    ("data", "cutmix_alpha"): 0.0,
    ("data", "mix_prob"): 1.0,
    ("data", "tta_translate"): 0,
    ("trainer", "class_weights"): None,
    ("trainer", "monitor"): "val_acc",
    ("trainer", "monitor_mode"): None,
    ("trainer", "save_top_k"): 1,
    ("trainer", "early_stopping_min_delta"): 0.0,
    ("trainer", "stop_at_train_loss"): None,
    ("trainer", "keep_checkpoints"): True,
    ("diagnostics", "profile_steps"): None,
    ("data", "sampler"): "shuffle",
}

# Keys that options of a group have dropped since, with the options that dropped them:
# an older checkpoint of those options recorded them, and still resumes. A key that
# moves gets an entry here, and a run of the last version that had it goes into
# tests/fixtures/old_runs (scripts/old_run_fixture.py) to check it.
BUILT_IN_DATA = {"fashion_mnist", "mnist", "cifar10", "cifar100", "svhn", "image_folder"}
DROPPED_KEYS = {
    ("data", "num_train"): BUILT_IN_DATA,  # data=synthetic's alone since 2026-11-28
    ("data", "num_test"): BUILT_IN_DATA,  # (data=custom's +data.num_test is the user's)
}


CACHE_OF_IN_MEMORY = {None: "auto", True: "memory", False: "none"}


def comparable(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys that a resumed run may change (and with the keys
    added since, where an older checkpoint's config lacks them, and without those
    dropped since, where an older one has them)."""
    comparable_config = {
        group: (
            {k: v for k, v in values.items() if (group, k) not in IGNORED_KEYS}
            if isinstance(values, dict)
            else values
        )
        for group, values in config.items()
        if group not in IGNORED_GROUPS
    }
    data = comparable_config.get("data")
    if isinstance(data, dict) and data.get("name") == "image_folder" and "cache" not in data:
        # a run from before data.cache: its defaults then are today's null and auto
        data.update(cache="auto", cache_dir=None)
        if data.get("mean") == IMAGENET_MEAN and data.get("std") == IMAGENET_STD:
            data.update(mean=None, std=None)
    if isinstance(data, dict) and data.get("name") == "custom" and "in_memory" in data:
        # data.in_memory (null, true, false) became data.cache (auto, memory, none)
        data.update(cache=CACHE_OF_IN_MEMORY[data.pop("in_memory")], cache_dir=None)
    for (group, key), value in ADDED_KEYS.items():
        if isinstance(comparable_config.get(group), dict):
            comparable_config[group].setdefault(key, value)
    for (group, key), options in DROPPED_KEYS.items():
        values = comparable_config.get(group)
        if isinstance(values, dict) and values.get("name") in options:
            values.pop(key, None)
    return comparable_config


def data_as_it_started(data: DataConfig, record: CheckpointRecord) -> DataConfig:
    """The data config of a run that continues ``record``'s: the images it started on
    (its data.sampling; runs before the key took the first N) and what its data settled
    where the config leaves it null or auto (data=custom's channels, size, classes,
    hold-out, mean and std, in memory or not; data=image_folder's cache, mean and std),
    so that nothing is worked out anew differently."""
    recorded = record.config.get("data") or {}
    sampling = recorded.get("sampling", "first")
    known = {f.name for f in fields(data)}
    # older versions set image_folder's mean and std in its config, and read it image by
    # image before data.cache was a key: a run of theirs goes on as it started
    source = {key: recorded[key] for key in ("mean", "std") if key in recorded}
    if data.name == "image_folder" and "cache" not in recorded:
        source["cache"] = "none"
    resolved = dict(record.data_resolved)
    if "in_memory" in resolved:  # data=custom before data.cache: memory, or workers
        resolved["cache"] = CACHE_OF_IN_MEMORY[bool(resolved.pop("in_memory"))]
    settled = {
        key: value
        for key, value in {**source, **resolved}.items()
        if key in known and getattr(data, key) in (None, "auto")  # left to be settled
    }
    if data.sampling != sampling:
        log.info(
            "data.sampling=%s: the run started with %s and goes on with it", data.sampling, sampling
        )
    return replace(data, sampling=sampling, **settled)


def find_checkpoint(
    resume: str | None,
    run_dir: Path,
    outputs: Path,
    config: dict[str, Any],
    runtime: dict[str, Any] | None = None,
    processes: int = 1,
    device_type: str | None = None,
) -> Path | None:
    """The checkpoint to continue, or None for a fresh run.

    ``resume`` is None (fresh), ``auto`` (this run folder's own checkpoint, else the newest
    unfinished run under ``outputs`` with the same config, the same number of
    ``processes`` and, where given, the same resolved ``runtime`` and ``device_type``,
    that no live process is writing) or a checkpoint / run folder path.
    """
    if resume is None:
        return None
    if resume != "auto":
        path = Path(resume).expanduser()
        if path.is_dir():
            path = path / "checkpoints" / "last.pt"
        if not path.is_file():
            raise CheckpointError(
                f"trainer.resume={resume!r}: no checkpoint at {path}; pass a checkpoint file, "
                f"a run folder holding checkpoints/last.pt, or trainer.resume=auto"
            )
        return path
    own = run_dir / "checkpoints" / "last.pt"
    if own.is_file():
        return own
    wanted = comparable(config)
    candidates = sorted(
        outputs.absolute().glob("**/checkpoints/last.pt"),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    for candidate in candidates:
        folder = candidate.parent.parent
        if is_finished(folder) or has_diverged(folder) or was_pruned(folder):
            continue  # a pruned trial stopped on purpose: trainer.resume=PATH continues it
        if (holder := lock_holder(folder)) is not None:
            log.info("not resuming %s: %s is still writing it", folder, describe_holder(holder))
            continue
        try:
            record = CheckpointRecord.read(load_checkpoint(candidate), candidate)
        except CheckpointError as err:
            log.warning("skipping %s while looking for a run to resume: %s", candidate, err)
            continue
        if comparable(record.config) != wanted:
            continue
        saved_device = record.device_type or "cpu"
        if device_type is not None and saved_device != device_type:
            log.info(
                "not resuming %s: it trained on %s, this run is on %s",
                folder,
                saved_device,
                device_type,
            )
            continue
        same_runtime = runtime is None or record.runtime == runtime
        if same_runtime and record.world_size == processes:
            return candidate
    log.info(
        "trainer.resume=auto: no unfinished run of this config under %s to continue: "
        "starting a new run",
        outputs,
    )
    return None


def check_same_config(record: CheckpointRecord, config: dict[str, Any], path: Path) -> None:
    """Refuse, in one line, a checkpoint written with settings that change the run."""
    saved, wanted = comparable(record.config), comparable(config)
    differing = sorted(
        f"{group}.{key}"
        for group in wanted.keys() | saved.keys()
        for key in (wanted.get(group) or {}).keys() | (saved.get(group) or {}).keys()
        if (saved.get(group) or {}).get(key) != (wanted.get(group) or {}).get(key)
    )
    if differing:
        shown = ", ".join(differing[:4]) + (" ..." if len(differing) > 4 else "")
        raise CheckpointError(
            f"checkpoint {path} was written with another config ({shown} differ): resume "
            f"with the same settings (see its run folder's .hydra/config.yaml)"
        )


def check_same_world(record: CheckpointRecord, processes: int, path: Path) -> None:
    """Every process continues its own data position and random streams: a run resumes
    only with the number of processes it started with."""
    saved = record.world_size
    if saved != processes:
        raise CheckpointError(
            f"checkpoint {path} was written by {saved} process(es), this run has {processes}: "
            f"resume with the same number (trainer.devices={saved}, or torchrun "
            f"--nproc_per_node and --nnodes giving {saved} in all)"
        )


def check_same_device(record: CheckpointRecord, device: torch.device, path: Path) -> None:
    """RNG and GradScaler states belong to a device type: refuse to mix them."""
    saved_device = record.device_type or device.type
    if saved_device != device.type:
        raise CheckpointError(
            f"checkpoint {path} was written on {saved_device}, this run is on {device.type}: "
            f"resume with trainer.device={saved_device}"
        )


def check_same_runtime(
    record: CheckpointRecord, runtime: dict[str, Any], path: Path, reason: str
) -> None:
    """Refuse to continue at another precision or memory layout than the run started with.
    ``amp=auto`` and ``trainer.channels_last=null`` are resolved per machine, so the same
    config can mean fp32 on one machine and bf16 on the next (a requeue onto another node)."""
    saved = record.runtime
    if saved is None or saved == runtime:
        return
    amp = amp_option(saved["precision"])
    layout = {True: "channels_last", False: "contiguous"}
    raise CheckpointError(
        f"checkpoint {path} trained in {saved['precision']} with the "
        f"{layout[saved['channels_last']]} layout, but here it would continue in "
        f"{runtime['precision']} with the {layout[runtime['channels_last']]} layout "
        f"({reason}): resume with amp={amp} trainer.channels_last="
        f"{str(saved['channels_last']).lower()} to continue as it started"
    )


def rng_state(device: torch.device) -> dict[str, Any]:
    """Python's and torch's random states, and the run's own GPU's (not every GPU's: a
    requeued job may see another number of them)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    saved = cuda_state_for(state.get("cuda"), device)
    if saved is not None:
        torch.cuda.set_rng_state(saved, device)


def cuda_state_for(saved: Any, device: torch.device) -> torch.Tensor | None:
    """The saved CUDA random state to give ``device``, or None. Checkpoints of stable-cnn
    0.1 saved a list with every visible GPU's state: take the run's device's entry, or
    the first where that device did not exist then."""
    if saved is None or device.type != "cuda":
        return None
    if isinstance(saved, list | tuple):
        index = device.index or 0
        return saved[index] if index < len(saved) else saved[0]
    return saved


def locate_run(
    resume: str | None,
    run_dir: Path,
    outputs: Path,
    composed_config: dict[str, Any],
    runtime: Runtime,
    processes: int = 1,
) -> tuple[Path, Path | None, dict[str, Any] | None]:
    """Where this run writes, the checkpoint it continues (or None), and that checkpoint."""
    resume_from = find_checkpoint(
        resume,
        run_dir,
        outputs,
        composed_config,
        runtime.record(),
        processes,
        runtime.device.type,
    )
    resume_state = None if resume_from is None else load_checkpoint(resume_from)
    if resume_state is not None:
        check_resumable(resume_state, resume_from)
        record = CheckpointRecord.read(resume_state, resume_from)
        check_same_world(record, processes, resume_from)
        check_same_config(record, composed_config, resume_from)
        check_same_device(record, runtime.device, resume_from)
        check_same_runtime(record, runtime.record(), resume_from, runtime.precision.reason)
    if resume_from is not None and resume_from.parent.name == "checkpoints":
        run_dir = resume_from.parent.parent  # a resumed run keeps writing where it started
    elif holds_a_run(run_dir):
        raise UserError(
            f"run folder {run_dir} already holds a run: continue it with trainer.resume=auto, "
            f"or choose another hydra.run.dir"
        )
    return run_dir, resume_from, resume_state


def earlier_outcome(run_dir: Path) -> dict[str, Any] | None:
    """results.json of a run that already finished; a run that diverged with this very
    config would diverge again, so it raises its recorded reason."""
    if is_finished(run_dir):
        log.info("run %s already finished: nothing to resume", run_dir)
        return json.loads((run_dir / "results.json").read_text())
    failure = read_failure(run_dir)
    if failure is not None and failure["status"] == "diverged":
        raise TrainingDiverged(f"{failure['message']} (recorded earlier: not rerun)")
    return None
