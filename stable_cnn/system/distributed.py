"""Process-group plumbing, all of it: which process this is, joining and leaving the
group, the few collectives the run needs, and starting N local workers for
``trainer.devices=N``. The rest of the package asks a ``World`` (``is_main``, ``sum``,
``barrier``, ...) and never reads ``RANK`` or calls ``torch.distributed`` itself.

A single process is a ``World()`` of size 1, whose collectives do nothing, so the
loop has one code path. Workers are started by ``torchrun``, by SLURM or submitit
(one task per process), or by ``trainer.devices=N`` through torch.distributed's own
elastic launcher, the engine behind torchrun.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from stable_cnn.errors import ConfigError

# How long a collective may wait for the slowest rank before the job fails. Long enough
# for rank 0 to write a checkpoint or extract a dataset while the others wait.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes (one process: rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # rank among the processes on this machine
    local_size: int = 1  # processes on this machine
    # What started the processes: "torchrun" (trainer.devices too), "slurm" or
    # "submitit-local". A launched process joins a process group even when alone in it, so that
    # torchrun with one process runs the very DDP path of many (NCCL included).
    launcher: str = ""

    @property
    def is_main(self) -> bool:
        """The one process that writes the run's files and logs at INFO."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return bool(self.launcher) or self.size > 1

    @property
    def backend(self) -> str:
        return str(dist.get_backend()) if dist.is_initialized() else "none"

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place (on a GPU the host does not wait)."""
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """A boolean tensor that is true only where it is true on every process."""
        if not self.distributed:
            return flag
        agreed = flag.to(torch.int32)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
        return agreed.bool()

    def rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` stacked: shape (size, *tensor.shape), rank order."""
        if not self.distributed:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every process."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value`` (picklable), in rank order, on every process."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def agree_on_reason(self, reason: str) -> str:
        """The first non-empty reason among the processes (e.g. a signal that reached only
        one of them), so that every process stops at the same step."""
        if not self.distributed:
            return reason
        reasons = self.gather(reason)
        first = next((r for r in reasons if r), "")
        if first and not reason:
            first = f"{first} (on rank {reasons.index(first)})"
        return first

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the body on each machine's first process, then on the others: a dataset
        is extracted once per machine. If the first process fails, the others still
        get past the barrier and meet the same error themselves."""
        if not self.is_local_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_local_main:
                self.barrier()

    def share_batchnorm_statistics(self, model: nn.Module) -> None:
        """Give every process rank 0's BatchNorm running statistics, the ones its
        checkpoint saves, so that all evaluate the same model (a no-op under
        SyncBatchNorm, where they are equal already)."""
        if not self.distributed:
            return
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                for buffer in module.buffers():
                    dist.broadcast(buffer, src=0)


ALONE = World()  # a single process


def world_from_environment(environ: dict[str, str] | None = None) -> World:
    """The world a launcher set up for this process: torchrun's variables (RANK,
    WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), else a SLURM job step or a submitit job
    with several tasks, else a single process. Read from ``os.environ`` once: finding
    the SLURM peers exports torchrun's variables, which must not change the answer."""
    if environ is None:
        return _this_process_world()
    env = environ
    if "RANK" in env and "WORLD_SIZE" in env:
        size = int(env["WORLD_SIZE"])
        return World(
            rank=int(env["RANK"]),
            size=size,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
            launcher="torchrun",
        )
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:  # hydra/launcher=submitit_local
        return submitit_world("submitit-local")
    # SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: the batch script itself is not a task of the step
    if int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return slurm_world(env)
    return ALONE


@functools.cache
def _this_process_world() -> World:
    return world_from_environment(dict(os.environ))


def submitit_world(launcher: str) -> World:
    """One process per task of a submitit job: submitit derives the rendezvous (the
    first node's address, a port from the job id) and exports torchrun's variables."""
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return World(env.rank, env.world_size, env.local_rank, env.local_world_size, launcher)


def slurm_world(env: dict[str, str]) -> World:
    """One process per task of a SLURM job step (``srun``, or submitit's SLURM jobs):
    the rendezvous is the step's first node, at a port derived from the job id, as
    submitit chooses them."""
    if env.get("SUBMITIT_EXECUTOR") == "slurm":
        return submitit_world("slurm")
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env["SLURM_STEP_NUM_TASKS"]))
    node = int(env.get("SLURM_NODEID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = first_host(env.get("SLURM_STEP_NODELIST", ""))
    os.environ.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 40000))
    return World(
        rank=int(env["SLURM_PROCID"]),
        size=int(env["SLURM_STEP_NUM_TASKS"]),
        local_rank=int(env.get("SLURM_LOCALID", "0")),
        local_size=counts[node] if node < len(counts) else counts[-1],
        launcher="slurm",
    )


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list, e.g. '4(x2),3' -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` expands it)."""
    try:
        shown = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        raise ConfigError(
            f"cannot expand the SLURM node list {nodelist!r} (scontrol failed): set "
            f"MASTER_ADDR to the first node's address, or start the processes with torchrun"
        ) from None
    return shown.stdout.split()[0]


def join(world: World) -> None:
    """Join the process group (a no-op for one process). Collectives on CPU tensors go
    through gloo and, where CUDA is available, those on GPU tensors through NCCL."""
    if not world.distributed or dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=world.rank,
        world_size=world.size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    atexit.register(leave)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process_of_group(code: object) -> None:
    """End a process that joined a process group with ``code`` (sys.exit's): leave the
    group, flush, and exit at once. In the interpreter's own teardown after that, gloo
    sometimes aborts the process ("terminate called without an active exception": exit
    -6) when the run has finished and written everything, turning a success into a
    failure for torchrun. A process that joined no group returns and exits as usual."""
    if not dist.is_initialized():
        return
    leave()
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


def device_for(world: World, requested: str) -> str:
    """This process's device: with several processes and a CUDA device, the GPU of its
    local rank (``cuda:LOCAL_RANK``, or ``cuda:0`` where each process sees only its own)."""
    if world.local_size > 1 and requested.startswith("cuda:"):
        raise ConfigError(
            f"trainer.device={requested} would put all {world.local_size} processes of this "
            f"machine on one GPU: use trainer.device=auto (or cuda), one GPU per process"
        )
    if not world.distributed or requested not in ("auto", "cuda"):
        return requested
    if not torch.cuda.is_available():
        return requested
    count = torch.cuda.device_count()
    if count == 1 and world.launcher == "slurm":
        return "cuda:0"  # each task sees only its own GPU
    if count < world.local_size:
        raise ConfigError(
            f"{world.local_size} processes on this machine but only {count} GPUs: start one "
            f"process per GPU (torchrun --nproc_per_node={count} or trainer.devices={count})"
        )
    return f"cuda:{world.local_rank}"


def threads_per_process(world: World, cores: int) -> int:
    """CPU threads for this process, given the ``cores`` it may run on: SLURM gives each
    task cores of its own (cpus_per_task); torchrun's processes share the machine's, so
    each takes an equal part (torchrun alone would leave each one thread)."""
    if world.launcher == "slurm":
        return cores
    return max(1, cores // world.local_size)


def check_devices(world: World, devices: int) -> None:
    """``trainer.devices`` inside an already started world must match it."""
    if world.distributed and devices not in (1, world.local_size):
        raise ConfigError(
            f"trainer.devices={devices} but this machine runs {world.local_size} processes "
            f"of this job: leave trainer.devices=1 under torchrun or SLURM (the launcher "
            f"sets the process count), or make them equal"
        )


def wrap_for_training(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` when there are several processes (it
    averages gradients during backward); ``model`` itself otherwise. Keep ``model``
    for saving: the wrapper's keys carry a ``module.`` prefix.

    BatchNorm's buffers are not broadcast at every forward pass (broadcast_buffers
    off): each process keeps its own running statistics while it trains, and
    ``share_batchnorm_statistics`` hands out rank 0's before evaluation."""
    if not world.distributed:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    # The option's newer name where torch has it (the older one warns there).
    no_sync = "forward_sync_buffers" in inspect.signature(ddp).parameters
    buffers = {"forward_sync_buffers" if no_sync else "broadcast_buffers": False}
    return ddp(model, device_ids=device_ids, **buffers)


SHUTDOWN_GRACE_S = 300


def launch_local_workers(devices: int, arguments: list[str], preempted_status: int) -> int:
    """Start ``devices`` processes of ``python -m stable_cnn.cli.train arguments`` on this
    machine through torch.distributed's elastic launcher (torchrun's engine) and wait
    for them; returns the exit status the command should end with: ``preempted_status``
    if any worker stopped for a signal, else the first non-zero status, else 0."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # After a signal, the launcher waits this long for the workers to agree on the stop
    # (at the next log interval), save and exit, before it kills them.
    grace = {"shutdown_timeout": SHUTDOWN_GRACE_S}
    if "shutdown_timeout" not in inspect.signature(LaunchConfig).parameters:
        grace = {}  # older torch: its fixed 30 s
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=devices,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.5,
        **grace,
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # each worker sets its own thread count
    try:
        elastic_launch(config, sys.executable)("-u", "-m", "stable_cnn.cli.train", *arguments)
    except ChildFailedError as failed:
        statuses = [failure.exitcode for failure in failed.failures.values()]
        if preempted_status in statuses:
            return preempted_status
        return next((s for s in statuses if s > 0), 1)
    except SignalException:
        # The launcher passed the signal on; the workers saved and stopped (or were
        # killed after the launcher's grace period).
        return preempted_status
    return 0
