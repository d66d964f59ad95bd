"""Seeds: one ``trainer.seed`` for the run, separate random streams derived from it.

Model init and dropout draw from torch's global generator, data order and augmentation
from the data's own generator. Seeded with the same integer, the two would draw the same
random bits (dropout masks correlated with crops and flips), so each stream gets a seed
of its own, derived from the run's seed and the stream's name.
"""

from __future__ import annotations

import hashlib
import os
import random

import torch


def stream_seed(seed: int, stream: str) -> int:
    """A 63-bit seed for the named stream, the same on every machine and Python."""
    digest = hashlib.sha256(f"stable-cnn/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python and torch (every CUDA device too) for the model's stream; the data
    stream is seeded where the data is built, with ``stream_seed(seed, "data")``."""
    random.seed(stream_seed(seed, "python"))
    torch.manual_seed(stream_seed(seed, "model"))
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; set before CUDA starts.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: the few CUDA kernels without a deterministic version warn, not crash.
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif torch.are_deterministic_algorithms_enabled():  # a multirun's jobs share the process
        # (asked only where it is on: setting it imports torch's compiler, 1.5 s)
        torch.use_deterministic_algorithms(False)
    # cuDNN autotuning picks kernels by timing, so it is off when runs must repeat exactly.
    torch.backends.cudnn.benchmark = not deterministic and torch.cuda.is_available()


def seed_own_stream(seed: int, rank: int) -> None:
    """After the model is built (its initial weights are the same everywhere), give each
    process but rank 0 a dropout stream of its own, so that no two processes draw the
    same masks; rank 0 goes on as a single process would."""
    if rank > 0:
        random.seed(stream_seed(seed, f"python/{rank}"))
        torch.manual_seed(stream_seed(seed, f"model/{rank}"))
