"""How often the host waits for the device per training step: host reads of tensor values
and (on CUDA) the syncs torch.cuda.set_sync_debug_mode reports, for the eager step,
the compiled one and the one captured in a CUDA graph. Each is counted over an epoch
of 10 steps and one of 40 (fresh model each time); the difference, over 30 steps, is
what a step costs. Anything above 0 stalls a GPU.

    python scripts/host_syncs.py --device cuda                    # scripts/gpu_check.sh
    python scripts/host_syncs.py --device cpu --paths eager      # host reads only
"""

from __future__ import annotations

import argparse

import torch

from stable_cnn.system.hardware import resolve_device
from stable_cnn.training.host_syncs import step_waits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--paths",
        default=None,
        help="eager,compiled,graphed (default: all that run on the device; graphed needs CUDA)",
    )
    parser.add_argument("--precisions", default="bf16,fp16")
    args = parser.parse_args()
    device = resolve_device(args.device)
    paths = args.paths.split(",") if args.paths else ["eager", "compiled"]
    if not args.paths and device.type == "cuda":
        paths.append("graphed")
    print(f"device {device}, torch {torch.__version__}; SmallCNN width 16, batch 64")
    print("| step | precision | host reads per step | CUDA syncs per step | epoch-end reads |")
    print("|---|---|---:|---:|---:|")
    for path in paths:
        for precision in args.precisions.split(","):
            if path == "graphed" and precision == "fp16":
                continue  # fp16's GradScaler decides on the host: the graph falls back
            waits = step_waits(path, precision, device)
            syncs = f"{waits.syncs_per_step:.2f}" if device.type == "cuda" else "n/a (CPU)"
            print(
                f"| {path} | {precision} | {waits.reads_per_step:.2f} | {syncs} | "
                f"{waits.epoch_reads} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
