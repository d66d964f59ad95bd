"""What the two study commands (stable-cnn-ablate, stable-cnn-map) share on the command
line: the options every study takes, and the overrides every one of its runs gets."""

from __future__ import annotations

import argparse
from pathlib import Path


def study_parser(prog: str, description: str, out: str, report: str) -> argparse.ArgumentParser:
    """The options of a study: --seeds, --full, --out, --report, --device and the
    stable-cnn-train overrides for every run; the command adds its own."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--seeds", type=int, default=3, help="runs per variant and setting (3)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="the full-size study: width 64, more epochs, all data (a GPU job)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path(out), help=f"where the runs go (default {out})"
    )
    parser.add_argument(
        "--report",
        type=Path,
        default=Path(report),
        help=f"the markdown report; the PNG goes beside it (default {report})",
    )
    parser.add_argument("--device", default="auto", help="trainer.device for every run")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="extra stable-cnn-train overrides for every run, e.g. data=mnist",
    )
    return parser


def every_run(args: argparse.Namespace, small: list[str], full: list[str]) -> list[str]:
    """The overrides every run of the study gets: its size, the device, the user's own."""
    return [*(full if args.full else small), f"trainer.device={args.device}", *args.overrides]
