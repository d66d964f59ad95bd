"""The whole training step in one CUDA graph (``trainer.cuda_graph=true``).

A SmallCNN step at batch 128 launches a few hundred small kernels; on a GPU as fast as
an H100 the host cannot launch them as fast as the device runs them. Captured once in
a CUDA graph (forward, backward, clipping, the fused optimizer, the BatchNorm guard and
the epoch's sums) and replayed per batch, the step is one launch. Shapes are static
(training batches are all full: the last partial one is dropped), as graphs require.

What it needs, and falls back to eager (with one warning) without: a CUDA device; no
GradScaler (bf16 or fp32: fp16's scaler decides on the host); a fused optimizer (not
Muon); no mixup or cutmix (drawn on the host); and a schedule that changes only the
learning rate (OneCycle also cycles the momentum, which a graph would freeze). The
learning rate goes in as a tensor the host refills before each replay, so every
schedule step still takes effect.
"""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

from stable_cnn.config import ClippingConfig
from stable_cnn.data.augment import BatchMixing
from stable_cnn.state.progress import EpochProgress
from stable_cnn.system.distributed import ALONE, World
from stable_cnn.system.hardware import Runtime
from stable_cnn.training.muon import MuonWithAuxiliary
from stable_cnn.training.step import Batch, StepOutcome, TrainStep, skips_on_device

log = logging.getLogger(__name__)
WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuDNN, allocator)


def capture_problem(
    runtime: Runtime,
    scaler: torch.amp.GradScaler,
    optimizer: torch.optim.Optimizer,
    cycles_momentum: bool,
    world: World = ALONE,
) -> str:
    """Why this run's step cannot be captured, or ''."""
    if world.distributed:
        return "several processes average gradients through DDP's hooks, outside a graph"
    if runtime.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {runtime.device.type}"
    if scaler.is_enabled():
        return "fp16's GradScaler decides on the host: use amp=bf16 (or off)"
    if not skips_on_device(optimizer):
        return "the optimizer is not fused"
    if isinstance(optimizer, MuonWithAuxiliary):  # Muon's step reads its lr on the host
        return "optimizer=muon steps with a learning rate the graph cannot change"
    if cycles_momentum:
        return "scheduler=onecycle changes the momentum every step"
    return ""


class GraphedTrainStep:
    """A TrainStep captured in a CUDA graph at its first batch and replayed from then on;
    if capturing fails, it says so in one line and the step stays eager."""

    def __init__(self, step: TrainStep) -> None:
        self.step = step  # what is captured, and what runs where nothing is
        self.model, self.runtime = step.model, step.runtime
        self.optimizer, self.scaler = step.optimizer, step.scaler
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed = False

    def run(self, batches: list[Batch], progress: EpochProgress) -> StepOutcome:
        if self.failed or len(batches) > 1:
            return self.step.run(batches, progress)
        images, labels = batches[0]
        if self.graph is None:
            try:
                self.capture(images, labels)
            except Exception as err:  # torch raises many kinds; the run must go on
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
                log.warning(
                    "trainer.cuda_graph=true: capture failed (%s); training eagerly", reason
                )
                self.failed, self.graph = True, None
                torch.cuda.synchronize(self.runtime.device)
                # gradients made during the failed capture point at memory no kernel wrote
                self.optimizer.zero_grad(set_to_none=True)
                return self.step.run(batches, progress)
        return self.replay(images, labels, progress)

    def capture(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Warm up, then capture one step on static tensors. The random state is put back
        afterwards, also when either raises, so the warm-up's draws never happened."""
        device = self.runtime.device
        self.images, self.labels = images.clone(), labels.clone()
        self.progress = EpochProgress.start(device)
        groups = self.optimizer.param_groups
        self.learning_rates = [torch.tensor(float(g["lr"]), device=device) for g in groups]
        random_state = torch.cuda.get_rng_state(device)
        floats = [g["lr"] for g in groups]
        capturable = [g.get("capturable") for g in groups]
        try:
            self.warm_up()
            for group, rate in zip(groups, self.learning_rates, strict=True):
                group["lr"] = rate  # read from device memory at every replay
                if "capturable" in group:
                    group["capturable"] = True  # AdamW's capture check; fused is capturable
            self.graph, self.outcome = self.record_step()
        finally:
            for group, rate, flag in zip(groups, floats, capturable, strict=True):
                group["lr"] = rate
                if flag is not None:
                    group["capturable"] = flag
            torch.cuda.set_rng_state(random_state, device)
        log.info("training step captured in a CUDA graph (trainer.cuda_graph=true)")

    def warm_up(self) -> None:
        """Eager steps on a side stream, every update vetoed (nothing changes), so that
        cuDNN's choices and the allocator's pools are made before the capture."""
        device = self.runtime.device
        self.optimizer.zero_grad(set_to_none=True)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            scratch = EpochProgress.start(device)
            for _ in range(WARMUP_STEPS):
                self.step.run([(self.images, self.labels)], scratch, veto=True)
        torch.cuda.current_stream(device).wait_stream(side)

    def record_step(self) -> tuple[torch.cuda.CUDAGraph, StepOutcome]:
        """Capture one step on the static tensors. Begin and end are driven here rather
        than by ``torch.cuda.graph``, whose exit, when the capture was invalidated (a
        host sync inside the step, a lazy initialisation), raises from capture_end()
        before it puts the stream back, with a message that hides the cause. Here a
        failure leaves the previous stream current (``torch.cuda.stream``'s exit runs
        whatever happens), the capture ended, its memory pool handed back and the
        generator out of capture mode, and raises the step's own error."""
        device = self.runtime.device
        torch.cuda.synchronize(device)
        gc.collect()  # not in the middle of the capture
        graph, pool = torch.cuda.CUDAGraph(), torch.cuda.graph_pool_handle()
        # Its own stream on the run's device (the default capture stream belongs to the
        # device current when it was first made); thread_local: a DataLoader's
        # pin-memory thread allocating meanwhile does not invalidate the capture.
        with torch.cuda.stream(torch.cuda.Stream(device)):
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                outcome = self.step.run([(self.images, self.labels)], self.progress)
            except BaseException:
                leave_failed_capture(graph, pool, device, end_raised=False)
                raise
            try:
                graph.capture_end()
            except BaseException:
                leave_failed_capture(graph, pool, device, end_raised=True)
                raise
        return graph, outcome

    def replay(
        self, images: torch.Tensor, labels: torch.Tensor, progress: EpochProgress
    ) -> StepOutcome:
        """One replay on this batch; ``progress`` is made to hold the graph's sums."""
        if progress.values is not self.progress.values:
            self.progress.values.copy_(progress.values)
            progress.values = self.progress.values
        for group, rate in zip(self.optimizer.param_groups, self.learning_rates, strict=True):
            rate.fill_(float(group["lr"]))  # the schedule's latest value, no host read
        self.images.copy_(images)
        self.labels.copy_(labels)
        self.graph.replay()
        return self.outcome


def leave_failed_capture(
    graph: torch.cuda.CUDAGraph, pool: tuple[int, int], device: torch.device, end_raised: bool
) -> None:
    """Undo what a failed capture left behind, so that eager steps run as if it had never
    been tried: the stream's capture ended, the graph's private memory pool no longer
    collecting allocations (torch stops that only once a capture ends well), and the
    CUDA generator out of capture mode (older torch keeps it there until then)."""
    pool_left_open = end_raised
    if not end_raised:  # the step itself raised: its capture is still open
        try:
            graph.capture_end()
        except RuntimeError:  # an invalidated capture raises as it ends
            pool_left_open = True
    graph.reset()
    if pool_left_open:
        for name in ("_cuda_endAllocateToPool", "_cuda_releasePool"):  # private: where present
            release = getattr(torch._C, name, None)
            if release is not None:
                with contextlib.suppress(RuntimeError):
                    release(device.index, pool)
    try:
        torch.rand(1, device=device)  # raises where the generator still believes it captures
    except RuntimeError:
        repair = torch.cuda.CUDAGraph()
        with torch.cuda.stream(torch.cuda.Stream(device)):
            repair.capture_begin()
            torch.rand(1, device=device)
            repair.capture_end()  # takes the generator out of capture mode


def build_train_step(
    model: torch.nn.Module,
    criterion: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    clipping: ClippingConfig,
    runtime: Runtime,
    loss_spike_factor: float,
    cuda_graph: bool,
    cycles_momentum: bool,
    world: World = ALONE,
    accumulate: int = 1,
    no_sync: Callable[[], AbstractContextManager] | None = None,
    mixing: BatchMixing | None = None,
) -> TrainStep | GraphedTrainStep:
    """The run's TrainStep: captured in a CUDA graph where asked for and possible."""
    step = TrainStep(
        model, criterion, optimizer, scaler, clipping, runtime, loss_spike_factor, no_sync, mixing
    )
    if cuda_graph:
        problem = capture_problem(runtime, scaler, optimizer, cycles_momentum, world)
        if accumulate > 1:
            problem = problem or "trainer.accumulate_grad_batches>1 is not captured"
        if mixing is not None:  # a graph would replay the first batch's draws for ever
            problem = problem or "mixup and cutmix draw their mix on the host every step"
        if problem:
            log.warning("trainer.cuda_graph=true ignored: %s; training eagerly", problem)
        else:
            return GraphedTrainStep(step)
    return step
