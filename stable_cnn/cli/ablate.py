"""``stable-cnn-ablate``: what each stabilising technique of the tutorial's recipe
contributes (studies/ablation.py does the work; its report: docs/ablation.md)."""

from __future__ import annotations

import statistics
import sys

from stable_cnn.cli.study import every_run, study_parser
from stable_cnn.studies.ablation import FULL, SMALL, VARIANTS, collect, plot, render
from stable_cnn.studies.sweep import describe_machine, run_variant_sweep, write_study_report


def cli(argv: list[str] | None = None) -> None:
    parser = study_parser(
        "stable-cnn-ablate",
        "Train the full recipe and one variant per removed technique, at a normal and a "
        "stress learning rate, and write a markdown report with a PNG of validation curves. "
        "The default study takes about 30 minutes on a 2-core CPU.",
        out="outputs/ablation",
        report="docs/ablation.md",
    )
    parser.add_argument("--lr", type=float, default=0.05, help="normal learning rate (0.05)")
    parser.add_argument(
        "--stress-lr",
        type=float,
        default=2.0,
        help="the too-high learning rate of the stress setting (2.0, 40x the normal one)",
    )
    args = parser.parse_args(argv)
    base = every_run(args, SMALL, FULL)
    lrs = {"normal": args.lr, "stress": args.stress_lr}
    log = args.out / "ablation.log"
    print(
        f"training {len(VARIANTS) * len(lrs) * args.seeds} runs into {args.out} (log: {log})",
        flush=True,
    )
    status = run_variant_sweep(
        args.out, base, list(VARIANTS), list(lrs.values()), args.seeds, log.name
    )
    if status != 0:
        print(f"some runs failed (sweep exit {status}): see {log}")
    rows = collect(args.out, lrs, args.device)
    for row in rows:
        accuracies = row.accuracies()
        summary = f"{statistics.fmean(accuracies):.2f}%" if accuracies else "no finished run"
        print(f"{row.setting:>6} {row.name:<13} {summary}  diverged {row.diverged}/{len(row.runs)}")
    command = "stable-cnn-ablate " + " ".join(argv if argv is not None else sys.argv[1:])
    settings = (
        f"`{' '.join(base)}`; optimizer.lr {args.lr} (normal) and "
        f"{args.stress_lr} (stress); {args.seeds} seeds each; otherwise the tutorial's "
        "recipe"
    )
    markdown = render(rows, command.strip(), describe_machine(args.device), settings)
    written = write_study_report(
        args.report, markdown, lambda png: plot(rows, png), "validation accuracy per variant"
    )
    print("wrote " + " and ".join(str(path) for path in written))


if __name__ == "__main__":
    cli()
