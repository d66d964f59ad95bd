"""``stable-cnn-report FOLDER``: one table of the training runs below a folder (a sweep,
or outputs/), seeds aggregated; studies/report.py does the work."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stable_cnn.errors import UserError
from stable_cnn.studies.report import METRICS, write_report


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="stable-cnn-report",
        description="Tabulate the runs below a folder (a sweep, or outputs/): markdown and "
        "CSV tables with seeds aggregated, and a PNG of validation-accuracy curves.",
    )
    parser.add_argument("folder", type=Path, help="a sweep folder, a run folder or outputs/")
    parser.add_argument(
        "--metric",
        choices=METRICS,
        default="best_val_acc",
        help="sort by this metric, best first (a loss lowest first; default: best_val_acc)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where report.md, report.csv, val_acc.png go (default: FOLDER)",
    )
    args = parser.parse_args(argv)
    try:
        written = write_report(args.folder, args.out or args.folder, args.metric)
    except UserError as err:
        print(f"stable-cnn-report: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    sys.stdout.write(written[0].read_text())
    if len(written) < 3:
        print("(no plot: matplotlib is not installed; pip install matplotlib)", file=sys.stderr)
    print("wrote " + ", ".join(str(path) for path in written), file=sys.stderr)
