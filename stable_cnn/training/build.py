"""What a run is built from, before its first epoch: the device and precision, the run
folder and the checkpoint it continues (agreed among the processes), the data, the
model (SyncBatchNorm and DDP where several processes train), optimizer, schedule,
scaler, the weight average and the run's state, resumed if asked.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stable_cnn.config import (
    CachedDataConfig,
    CustomModelConfig,
    ImageFolderConfig,
    OneCycleConfig,
    ResNetConfig,
    RunConfig,
    TimmConfig,
    TrainerConfig,
)
from stable_cnn.data.build import batch_mixing, build_splits
from stable_cnn.data.custom import custom_cache
from stable_cnn.data.image_folder import folder_cache
from stable_cnn.data.loaders import dataset_labels
from stable_cnn.data.splits import DatasetInfo, DataSplits, Shard
from stable_cnn.errors import ConfigError, DataError, UserError
from stable_cnn.models.build import build_model, describe_model
from stable_cnn.models.ema import WeightEMA
from stable_cnn.models.global_batchnorm import GlobalBatchNorm
from stable_cnn.models.resnet import SMALL_INPUT_UP_TO
from stable_cnn.state.checkpoint import load_checkpoint
from stable_cnn.state.record import CheckpointRecord
from stable_cnn.state.resume import locate_run
from stable_cnn.state.run_lock import RunLock
from stable_cnn.state.run_state import RunState
from stable_cnn.system.distributed import (
    ALONE,
    World,
    device_for,
    threads_per_process,
    wrap_for_training,
)
from stable_cnn.system.hardware import (
    Runtime,
    choose_memory_format,
    choose_precision,
    compile_model,
    describe_cpu,
    loader_workers,
    resolve_device,
    usable_cores,
    use_tf32,
)
from stable_cnn.system.seeding import seed_own_stream
from stable_cnn.training.captured_step import GraphedTrainStep, build_train_step
from stable_cnn.training.monitor import Monitor, tidy_kept
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.profiling import ProfiledStep
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import TrainStep
from stable_cnn.training.trackers import RunLabels
from stable_cnn.training.tracking import RunTracker, open_tracker

log = logging.getLogger("stable_cnn")


def model_config(run: RunConfig, info: DatasetInfo) -> dict[str, Any]:
    """The model's spec: what it takes to rebuild it from a checkpoint, the data's input
    channels, classes and size included (SyncBatchNorm is a way of training it, not a
    part of it). A SmallCNN's is what checkpoints have always held."""
    model = run.model
    data = {"in_channels": info.in_channels, "num_classes": info.num_classes}
    sized = {**data, "image_size": info.image_size}
    if isinstance(model, ResNetConfig):
        small = model.small_input
        if small is None:
            small = info.image_size <= SMALL_INPUT_UP_TO
        return {
            "kind": "resnet",
            "arch": model.arch,
            "small_input": small,
            "weights": model.weights,
            **sized,
        }
    if isinstance(model, TimmConfig):
        return {
            "kind": "timm",
            "name": model.name,
            "pretrained": model.pretrained,
            "kwargs": dict(model.kwargs),
            **sized,
        }
    if isinstance(model, CustomModelConfig):
        return {"kind": "custom", "target": model._target_, "kwargs": dict(model.kwargs), **sized}
    return {**data, **{k: v for k, v in asdict(model).items() if k != "sync_batchnorm"}}


def choose_runtime(run: RunConfig, world: World = ALONE) -> Runtime:
    """Device, precision and memory layout for this process; logs what it chose and why."""
    if run.trainer.num_threads is not None:
        torch.set_num_threads(run.trainer.num_threads)
    elif world.distributed:
        torch.set_num_threads(threads_per_process(world, usable_cores()))
    device = resolve_device(device_for(world, run.trainer.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # cuda:N is the current device for every kernel
    precision = choose_precision(run.amp.name, device)
    memory_format = choose_memory_format(device, run.trainer.channels_last)
    each = f" (one of {world.size} processes, {world.backend})" if world.distributed else ""
    if device.type == "cpu":
        log.info("device cpu, %d threads%s, CPU %s", torch.get_num_threads(), each, describe_cpu())
    elif device.type == "cuda":
        log.info("device %s (%s)%s", device, torch.cuda.get_device_name(device), each)
    else:
        log.info("device %s%s", device, each)
    layout = "channels_last" if memory_format == torch.channels_last else "contiguous"
    log.info("precision %s (%s), %s layout", precision.name, precision.reason, layout)
    if use_tf32(device, run.trainer.tf32) and precision.name == "fp32":
        log.info("fp32 matmuls and convolutions in TF32 (trainer.tf32=false for full fp32)")
    return Runtime(device, precision, memory_format)


def agree_on_run(
    resume: str | None,
    run_dir: Path,
    outputs: Path,
    composed_config: dict[str, Any],
    runtime: Runtime,
    world: World,
    lock: RunLock | None = None,
) -> tuple[Path, Path | None, dict[str, Any] | None]:
    """Where the run writes, the checkpoint it continues (or None), and that checkpoint.
    Rank 0 decides (two processes looking for a run to resume could pick different
    ones) and takes the folder's ``lock`` (given on rank 0); the others follow, reading
    the checkpoint from the shared file system. A problem is every process's one line."""
    problem, decision, state = "", (run_dir, None), None
    if world.is_main:
        try:
            run_dir, resume_from, state = locate_run(
                resume, run_dir, outputs, composed_config, runtime, world.size
            )
            if lock is not None:
                lock.acquire_for(run_dir)
            decision = (run_dir, resume_from)
        except UserError as err:
            problem = str(err)
    problem, (run_dir, resume_from) = world.broadcast((problem, decision))
    if problem:
        raise UserError(problem)
    if resume_from is not None and state is None:
        state = load_checkpoint(resume_from)
    return run_dir, resume_from, state


@dataclass
class Training:
    """What the epochs work with, built once per run."""

    run: RunConfig
    world: World
    runtime: Runtime
    run_dir: Path
    data: DataSplits
    model: nn.Module  # the plain model: saved, exported, averaged
    network: nn.Module  # what trains: the model compiled and/or wrapped in DDP
    criterion: nn.Module
    state: RunState
    train_step: TrainStep | GraphedTrainStep | ProfiledStep
    tracker: RunTracker
    monitor: Monitor  # what picks best.pt and the kept checkpoints, and stops early

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / "checkpoints"


def build_training(
    run: RunConfig,
    world: World,
    runtime: Runtime,
    run_dir: Path,
    composed_config: dict[str, Any],
    resume: tuple[Path, dict[str, Any]] | None,
    data: DataSplits | None = None,
    labels: RunLabels | None = None,
) -> Training:
    """Data (``data`` where already built), model, optimizer, schedule, scaler and the
    run's state, resumed if asked, and its logs (the stores name the run by ``labels``)."""
    trainer = run.trainer
    data = data if data is not None else build_data(run, world, runtime)
    monitor = Monitor.of(trainer, data.info.num_classes)
    spec = model_config(run, data.info)
    model = build_model(spec).to(runtime.device, memory_format=runtime.memory_format)
    seed_own_stream(trainer.seed, world.rank)
    log.info(
        "model %s: %.2fM parameters",
        describe_model(spec),
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    if run.model.sync_batchnorm and world.distributed:  # the global batch's statistics
        model = GlobalBatchNorm.convert(model)
    network = wrap_for_training(model, world, runtime.device)
    no_sync = getattr(network, "no_sync", None)  # DDP's: micro-batches before the last
    if trainer.compile:
        network = compile_model(network, runtime.device)
    criterion = training_loss(trainer, data, runtime.device)
    state = build_state(run, world, runtime, data, model, spec, composed_config)
    if resume is not None:
        resume_from, resume_state = resume
        state.load_state_dict(resume_state, resume_from)
        log.info(
            "resuming from %s (%s, step %d)", resume_from, state.where(), state.counters.global_step
        )
        own_last = resume_from == run_dir / "checkpoints" / "last.pt"
        if world.is_main and own_last:
            tidy_kept(run_dir / "checkpoints", state.counters)
        if not own_last:  # the stores' runs went on past this checkpoint, or are another run's
            state.tracker_runs = {}
    train_step = build_train_step(
        network,
        criterion,
        state.optimizer,
        state.scaler,
        run.clipping,
        runtime,
        run.diagnostics.loss_spike_factor,
        trainer.cuda_graph,
        cycles_momentum=isinstance(run.scheduler, OneCycleConfig) and run.scheduler.cycle_momentum,
        world=world,
        accumulate=trainer.accumulate_grad_batches,
        no_sync=no_sync,
        mixing=batch_mixing(run.data, data.info.num_classes),
    )
    if run.diagnostics.profile_steps is not None and world.is_main:  # rank 0's steps
        profile_folder = run_dir / "profile"
        train_step = ProfiledStep(
            train_step, profile_folder, run.diagnostics.profile_steps, world.rank
        )
    counters = state.counters
    tracker = open_tracker(
        run_dir,
        world.is_main,
        counters.global_step,
        counters.epoch,
        run.logger,
        labels,
        state.tracker_runs,  # from the folder's last.pt the stores continue their runs
    )
    return Training(
        run,
        world,
        runtime,
        run_dir,
        data,
        model,
        network,
        criterion,
        state,
        train_step,
        tracker,
        monitor,
    )


def training_loss(trainer: TrainerConfig, data: DataSplits, device: torch.device) -> nn.Module:
    """Cross-entropy with the trainer's label smoothing and class weights (balanced: from
    the training labels, counted once here), logged where they are not all 1."""
    weights, classes = trainer.class_weights, data.info.num_classes
    if weights == "balanced":
        counts = torch.bincount(training_labels(data).cpu(), minlength=classes)[:classes]
        weights = (counts.sum() / (classes * counts.clamp(min=1))).tolist()
    if weights is not None:
        if len(weights) != classes:
            raise ConfigError(
                f"trainer.class_weights has {len(weights)} values for {classes} classes: "
                f"give one per class, in the order of the class names"
            )
        log.info(
            "class weights of the training loss: %s",
            ", ".join(
                f"{name} {w:.3g}" for name, w in zip(data.info.class_names, weights, strict=True)
            ),
        )
        weights = torch.tensor(weights, dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weights, label_smoothing=trainer.label_smoothing)


def training_labels(data: DataSplits) -> torch.Tensor:
    """Every training image's label: the tensor path's, or the folders' and datasets'
    own list (``targets``) on the DataLoader path."""
    train = data.train
    if hasattr(train, "labels"):
        return train.labels
    labels = dataset_labels(train.dataset.dataset)  # ShuffledLoader's SeededAugmentation
    if labels is None:
        raise ConfigError(
            "trainer.class_weights=balanced needs the training labels, and this dataset "
            "does not list them (targets): give the weights as a list, or data.cache=memory"
        )
    return labels


def build_data(run: RunConfig, world: World, runtime: Runtime) -> DataSplits:
    """This process's share of the run's data, logged in one line (with the global batch
    and, for image folders, the loader workers: this process's share of the cores)."""
    data_config = run.data
    if data_config.num_workers is None:
        workers = loader_workers(threads_per_process(world, usable_cores()))
        data_config = replace(data_config, num_workers=workers)
    if isinstance(data_config, CachedDataConfig) and data_config.cache == "auto":
        cache = cache_everywhere(data_config, world, runtime.device)
        data_config = replace(data_config, cache=cache)
    with world.local_main_first():  # a dataset is extracted once per machine
        shard = Shard(world.rank, world.size)
        data = build_splits(data_config, runtime.device, run.trainer.seed, shard)
    batch = data_config.batch_size
    per_process = f" per process, {batch * world.size} in all" if world.distributed else ""
    if data.loader_workers:
        per_process += f", {data.loader_workers} loader workers"
    log.info(
        "data %s: %d train / %d val / %d test images, batch %d%s",
        data.info.name,
        data.num_train,
        data.num_val,
        data.num_test,
        batch,
        per_process,
    )
    if data.resolved:
        settled = ", ".join(f"{key} {value}" for key, value in data.resolved.items())
        log.info("data %s, settled from the data: %s", data.info.name, settled)
    if data_config.sampler == "balanced":
        log.info(
            "data.sampler=balanced: %d draws an epoch, every class alike (with replacement)",
            data.num_train,
        )
    if data.val_is_test:
        log.warning("%s", data.val_is_test_reason)
    return data


def cache_everywhere(config: CachedDataConfig, world: World, device: torch.device) -> str:
    """data.cache=auto settled, the same on every process before any decodes: memory
    where every machine holds a copy per process and every GPU its own, else disk where
    every process can write its cache, else none (processes that went different ways
    would wait on each other for ever). The source is opened on each machine's first
    process first, as the data itself is built; where that fails on one process (a
    data=custom callable may fail any way), every process stops."""
    local_cache = folder_cache if isinstance(config, ImageFolderConfig) else custom_cache
    if not world.distributed:
        return local_cache(config, device)
    cache, failure = "none", None
    with world.local_main_first():
        try:
            cache = local_cache(config, device, world.local_size)
        except Exception as err:  # the user's code: any kind; the others must not wait
            failure = err
    reason = world.agree_on_reason(
        "" if failure is None else f"{type(failure).__name__}: {failure}"
    )
    if failure is not None:
        raise failure
    if reason:
        raise DataError(f"data={config.name} could not be opened: {reason}")
    agreed = [  # once per run: memory where all can, else disk, else none
        bool(world.all_true(torch.tensor(cache in ways, device=device)).item())
        for ways in (("memory",), ("memory", "disk"))
    ]
    return "memory" if agreed[0] else "disk" if agreed[1] else "none"


def build_state(
    run: RunConfig,
    world: World,
    runtime: Runtime,
    data: DataSplits,
    model: nn.Module,
    spec: dict[str, Any],
    composed_config: dict[str, Any],
) -> RunState:
    """The run's state: the model, optimizer, schedule, GradScaler, weight average, data
    position, and the record every checkpoint keeps."""
    optimizer = build_optimizer(model, run.optimizer)
    steps_per_epoch = -(-len(data.train) // run.trainer.accumulate_grad_batches)
    schedule = build_schedule(optimizer, run.scheduler, run.trainer.epochs, steps_per_epoch)
    # One GradScaler for the whole run: its loss scale is calibrated over many steps.
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler)
    ema = None if run.ema.name == "off" else WeightEMA(model, run.ema.decay, run.ema.warmup)
    record = CheckpointRecord(
        spec,
        composed_config,
        data.info.class_names,
        runtime.device.type,
        runtime.precision.name,
        runtime.channels_last,
        world.size,
        averaged=ema is not None,
        data_resolved=data.resolved,
    )
    return RunState(
        model, optimizer, schedule, scaler, data.train, runtime, record, ema, world=world
    )
