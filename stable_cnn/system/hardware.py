"""What this machine can do: the training device, and the precision and layout that are fast on it.

Measured for the SmallCNN on 2-core AMD EPYC machines: with AVX-512 BF16, bf16
autocast + channels_last trains about 2x faster than fp32; on an AVX2-only CPU,
bf16 is emulated and 7-10x slower and channels_last about 15% slower. So detect,
don't assume.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from stable_cnn.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: ``dtype`` None means plain fp32."""

    name: str  # fp32 | fp16 | bf16
    dtype: torch.dtype | None
    use_grad_scaler: bool  # fp16 gradients underflow without loss scaling
    reason: str  # one phrase for the run log


FP32 = Precision("fp32", None, False, "amp=off")


@dataclass(frozen=True)
class Runtime:
    """Where and how the model computes; chosen once per run."""

    device: torch.device
    precision: Precision
    memory_format: torch.memory_format  # channels_last where faster, else contiguous

    @property
    def channels_last(self) -> bool:
        return self.memory_format == torch.channels_last

    def record(self) -> dict[str, object]:
        """What a checkpoint keeps, so a resume continues at the same precision and layout."""
        return {"precision": self.precision.name, "channels_last": self.channels_last}


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA, then MPS, then the CPU; an unavailable device is a ConfigError.
    A CUDA device always carries its index (``auto`` and ``cuda`` mean the current
    device): ``torch.cuda.set_device`` and DDP's ``device_ids`` refuse one without."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={requested!r} but this machine has no usable CUDA GPU: "
                f"use trainer.device=cpu (or auto)"
            )
        index = torch.device(requested).index
        if index is None:
            index = torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device={requested!r} but only {torch.cuda.device_count()} CUDA "
                f"device(s) exist: use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if requested == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("trainer.device='mps' but MPS is not available: use trainer.device=cpu")
    return torch.device(requested)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_native_bf16() -> bool:
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def loader_workers(cores: int) -> int:
    """DataLoader worker processes for a process that may use ``cores`` cores: one per
    core but the trainer's own, at least 2 (decoding overlaps training even on two
    cores) and at most 16 (beyond that, start-up and memory grow for little gain)."""
    return max(2, min(16, cores - 1))


def describe_cpu() -> str:
    """The CPU features that decide the fast path, e.g. 'avx2 avx512f avx512_bf16'."""
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    present = [flag for flag in wanted if flag in cpu_flags()]
    return " ".join(present) or "no AVX2/AVX-512"


def choose_precision(
    amp: str, device: torch.device, cuda_capability: tuple[int, int] | None = None
) -> Precision:
    """Resolve ``amp`` (auto | fp16 | bf16 | off) for ``device``. On CUDA, ``auto`` is
    bf16 from compute capability 8.0 (Ampere) on: as fast as fp16 there, with fp32's
    range, so no GradScaler, no skipped steps and no sync; fp16 + GradScaler before."""
    native_bf16 = cpu_has_native_bf16()
    if amp == "off":
        return FP32
    if amp == "fp16":
        note = "amp=fp16" if device.type == "cuda" else "amp=fp16 (slow off CUDA)"
        return Precision("fp16", torch.float16, True, note)
    if amp == "bf16":
        slow = device.type == "cpu" and not native_bf16
        note = "amp=bf16 (emulated on this CPU: expect it 7-10x slower)" if slow else "amp=bf16"
        return Precision("bf16", torch.bfloat16, False, note)
    if device.type == "cuda":
        major, minor = cuda_capability or torch.cuda.get_device_capability(device)
        if major >= 8:
            why = f"amp=auto, GPU compute capability {major}.{minor} has native bf16"
            return Precision("bf16", torch.bfloat16, False, why)
        why = f"amp=auto, GPU compute capability {major}.{minor} lacks fast bf16"
        return Precision("fp16", torch.float16, True, why)
    if device.type == "cpu" and native_bf16:
        return Precision("bf16", torch.bfloat16, False, "amp=auto, CPU has native bf16")
    why = "CPU lacks native bf16 (emulated bf16 is 7-10x slower)" if device.type == "cpu" else ""
    return Precision("fp32", None, False, f"amp=auto, {why or device.type}")


def choose_memory_format(device: torch.device, channels_last: bool | None) -> torch.memory_format:
    """channels_last where it measured faster: CUDA, and CPUs with AVX-512 (fp32 +39%,
    bf16 +33% at width 32); on AVX2-only CPUs it measured about 15% slower.
    ``channels_last`` True/False overrides the choice."""
    if channels_last is None:
        channels_last = device.type == "cuda" or (device.type == "cpu" and "avx512f" in cpu_flags())
    return torch.channels_last if channels_last else torch.contiguous_format


def use_tf32(device: torch.device, allowed: bool) -> bool:
    """TF32 tensor cores for fp32 matmuls and convolutions (CUDA, compute capability 8.0+):
    about 8x the fp32 rate at fp16-like mantissa, the same range. Set (or reset, for a
    multirun's next job) on every run; returns whether it is in use."""
    active = allowed and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = active
        torch.backends.cudnn.allow_tf32 = active
    return active


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile(model)`` behind an eager fallback, or ``model`` itself with a
    one-line warning where the compiler cannot run. Keep using ``model`` for state_dict:
    the compiled wrapper's keys carry an ``_orig_mod.`` prefix."""
    missing = compiler_missing(device)
    if missing:
        log.warning("trainer.compile=true ignored: %s; training without torch.compile", missing)
        return model
    try:
        return CompiledWithFallback(model, torch.compile(model))
    except Exception as err:  # torch raises many kinds on unsupported platforms
        log.warning("trainer.compile=true ignored: torch.compile failed (%s)", err)
        return model


class CompiledWithFallback(torch.nn.Module):
    """Runs the compiled model; if the compiler fails (it compiles at the first forward
    pass, and again for a new input shape), says so in one line and runs eagerly from
    then on. Errors of the model itself are raised again by the eager run."""

    def __init__(self, model: torch.nn.Module, compiled: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        # Kept outside the module tree: it wraps `model`, whose parameters are listed once.
        self.__dict__["compiled"] = compiled

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        if self.compiled is not None:
            import torch._dynamo.exc

            try:
                return self.compiled(*args, **kwargs)
            except torch._dynamo.exc.TorchDynamoException as err:
                reason = str(err).strip().splitlines()[0][:200]
                log.warning("trainer.compile=true: compiling failed (%s); training eagerly", reason)
                self.__dict__["compiled"] = None
        return self.model(*args, **kwargs)


def compiler_missing(device: torch.device) -> str:
    """Why torch.compile cannot work here, or '' when it can."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python/platform"
    if device.type == "cpu" and not (shutil.which("cc") or shutil.which("gcc")):
        return "the CPU backend needs a C compiler (apt-get install gcc)"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "the CUDA backend needs Triton (pip install triton)"
    return ""
