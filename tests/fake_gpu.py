"""This CPU machine made to look like one with CUDA GPUs, at torch's API boundary only.

What it fakes, and why: ``torch.cuda``'s questions about the hardware (is_available,
device_count, get_device_capability, get_device_name, get_device_properties) and its
per-device state (current_device, set_device, the random-number state calls). That is
everything stable-cnn asks before its first kernel: device choice, precision, TF32,
seeding, the random state a checkpoint saves and restores, resume's device checks and
the distributed device mapping. The first real CUDA tensor still fails, as it would
without a GPU, so a test can assert that a run got that far and no further.

``set_device`` keeps torch's own argument check (``_get_device_index``), which is
where ``torch.cuda.set_device(torch.device("cuda"))`` raises on a real GPU machine.

Streams are faked only where a test asks (``install_streams``): code that moves its work
to a side stream (a CUDA graph's warm-up) then runs it on the CPU, in order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch.cuda._utils import _get_device_index

H100 = ("NVIDIA H100 80GB HBM3", (9, 0))
A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))
V100 = ("Tesla V100-SXM2-32GB", (7, 0))


@dataclass
class FakeGPU:
    """``count`` GPUs of ``name`` (or each its own, from ``names``) and compute
    ``capability``."""

    count: int = 1
    name: str = H100[0]
    names: tuple[str, ...] = ()  # each GPU's name, where they differ
    capability: tuple[int, int] = H100[1]
    current: int = 0
    set_device_calls: list[int] = field(default_factory=list)
    seeds: dict[int, int] = field(default_factory=dict)  # the last seed each device got
    restored: dict[int, torch.Tensor] = field(default_factory=dict)  # set_rng_state's

    def index(self, device: Any = None) -> int:
        index = _get_device_index(device, optional=True)
        if index == -1 or index is None:
            index = self.current
        if not 0 <= index < self.count:
            raise RuntimeError(f"CUDA error: invalid device ordinal {index} (fake GPU)")
        return index

    def set_device(self, device: Any) -> None:
        index = _get_device_index(device)  # torch's own check: raises for "cuda" alone
        self.set_device_calls.append(index)
        self.current = self.index(index)

    def device_capability(self, device: Any = None) -> tuple[int, int]:
        self.index(device)  # an invalid device raises, as torch's does
        return self.capability

    def device_name(self, device: Any = None) -> str:
        index = self.index(device)
        return self.names[index] if self.names else self.name

    def properties(self, device: Any = None) -> SimpleNamespace:
        major, minor = self.device_capability(device)
        return SimpleNamespace(
            name=self.device_name(device),
            major=major,
            minor=minor,
            total_memory=80 * 2**30,
            multi_processor_count=132,
        )

    def generator_index(self, device: Any) -> int:
        """The GPU whose generator torch.cuda's random-state calls mean: as torch's, the
        device's index (whatever its type), else the current GPU."""
        if isinstance(device, str):
            device = torch.device(device)
        index = device if isinstance(device, int) else device.index
        return self.index(self.current if index is None else index)

    def rng_state(self, device: Any = "cuda") -> torch.Tensor:
        """A 16-byte state as CUDA's Philox generator has: here the low byte of the
        device's last seed, then its index, then zeros."""
        index = self.generator_index(device)
        return torch.tensor([self.seeds.get(index, 0) & 0xFF, index] + [0] * 14, dtype=torch.uint8)

    def set_rng_state(self, state: torch.Tensor, device: Any = "cuda") -> None:
        self.restored[self.generator_index(device)] = state.clone()

    def manual_seed_all(self, seed: int) -> None:
        for index in range(self.count):
            self.seeds[index] = int(seed)

    def manual_seed(self, seed: int) -> None:
        self.seeds[self.current] = int(seed)

    def patches(self) -> dict[str, Callable[..., Any]]:
        return {
            "is_available": lambda: True,
            "device_count": lambda: self.count,
            "current_device": lambda: self.current,
            "set_device": self.set_device,
            "get_device_capability": self.device_capability,
            "get_device_name": self.device_name,
            "get_device_properties": self.properties,
            "get_rng_state": self.rng_state,
            "set_rng_state": self.set_rng_state,
            "manual_seed_all": self.manual_seed_all,
            "manual_seed": self.manual_seed,
        }

    def install_streams(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> FakeGPU:
        """Also fake torch.cuda's streams (Stream, stream, current_stream, default_stream,
        synchronize): each is a name for the CPU, which runs everything in order."""
        default = current = FakeStream()

        def current_stream(device: Any = None) -> FakeStream:
            return current

        @contextmanager
        def stream(chosen: FakeStream | None) -> Iterator[None]:
            nonlocal current
            before = current
            current = chosen or current
            try:
                yield
            finally:
                current = before

        fakes = {
            "Stream": FakeStream,
            "stream": stream,
            "current_stream": current_stream,
            "default_stream": lambda device=None: default,
            "synchronize": lambda device=None: None,
        }
        for name, fake in fakes.items():
            setattr_(torch.cuda, name, fake)
        return self

    def install(self, setattr_: Callable[[Any, str, Any], None] = setattr) -> FakeGPU:
        """Replace the functions on ``torch.cuda`` (through ``setattr_``: a pytest
        monkeypatch's, so that they come back after the test, or the builtin for a
        process of its own)."""
        for name, fake in self.patches().items():
            setattr_(torch.cuda, name, fake)
        return self


class FakeStream:
    """A CUDA stream that is a name only: the work issued on it runs on the CPU at once."""

    def __init__(self, device: Any = None, priority: int = 0) -> None:
        self.device = device

    def wait_stream(self, stream: FakeStream) -> None:
        pass  # in order already

    def synchronize(self) -> None:
        pass


def run_cli_on_fake_gpu(count: int, name: str, major: int, minor: int, *args: str) -> None:
    """``stable-cnn-train ARGS`` in this process, on ``count`` fake GPUs (for a subprocess:
    ``python -c 'from tests.fake_gpu import run_cli_on_fake_gpu; ...'``)."""
    import sys

    FakeGPU(count, name, (major, minor)).install()
    sys.argv = ["stable-cnn-train", *args]
    from stable_cnn.cli.train import cli

    cli()
