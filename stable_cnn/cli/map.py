"""``stable-cnn-map``: the learning rates at which each variant of the recipe trains
stably (studies/stability_map.py does the work; its report: docs/stability_map.md)."""

from __future__ import annotations

import shutil
import sys
import time

from stable_cnn.cli.study import every_run, study_parser
from stable_cnn.studies.stability_map import (
    FULL,
    LEARNING_RATES,
    SMALL,
    VARIANTS,
    collect,
    collect_suggestions,
    describe_range,
    plot,
    render,
    stable_range,
)
from stable_cnn.studies.sweep import (
    describe_machine,
    run_finder_sweep,
    run_variant_sweep,
    write_study_report,
)


def cli(argv: list[str] | None = None) -> None:
    parser = study_parser(
        "stable-cnn-map",
        "Train each variant of the recipe across a log-spaced grid of learning rates, "
        "several seeds each, and report where each one trains stably.",
        out="outputs/stability_map",
        report="docs/stability_map.md",
    )
    parser.add_argument(
        "--lrs",
        default=",".join(f"{lr:g}" for lr in LEARNING_RATES),
        help="comma-separated learning rates (default 0.003 ... 10)",
    )
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help="comma-separated variants (default: all)"
    )
    parser.add_argument(
        "--lr-find",
        action="store_true",
        help="also run stable-cnn-lr-find per variant at the same settings "
        "and judge its suggestion against the stable range",
    )
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(
            f"--variants {', '.join(unknown)}: not a variant; use some of {', '.join(VARIANTS)}"
        )
    if "full" not in names:
        parser.error("--variants must include full: every variant is judged against it")
    try:
        learning_rates = tuple(sorted(float(lr) for lr in args.lrs.split(",")))
    except ValueError:
        learning_rates = ()
    if not learning_rates or min(learning_rates) <= 0:
        parser.error(
            f"--lrs {args.lrs}: give positive numbers separated by commas, e.g. 0.01,0.1,1"
        )

    base = every_run(args, SMALL, FULL)
    total = len(names) * len(learning_rates) * args.seeds
    print(f"training {total} runs into {args.out} (log: {args.out / 'map.log'})", flush=True)
    started = time.perf_counter()
    status = run_variant_sweep(args.out, base, names, list(learning_rates), args.seeds, "map.log")
    wall = time.perf_counter() - started
    if status != 0:
        print(f"some runs failed (sweep exit {status}): see {args.out / 'map.log'}")
    variants = collect(args.out, learning_rates, names)
    if args.lr_find:
        print(f"the learning-rate finder, per variant, into {args.out / 'lr_find'}", flush=True)
        shutil.rmtree(args.out / "lr_find", ignore_errors=True)  # no earlier suggestions
        if run_finder_sweep(args.out / "lr_find", base, names, "map.log") != 0:
            print(f"the finder failed for some variants: see {args.out / 'map.log'}")
        collect_suggestions(args.out / "lr_find", variants)
    command = "stable-cnn-map " + " ".join(argv if argv is not None else sys.argv[1:])
    trained = sum(r.results.get("wall_s", 0.0) for v in variants for p in v.points for r in p.runs)
    header = [
        f"Command: `{command.strip()}`  ",
        f"Machine: {describe_machine(args.device)}  ",
        f"Settings: `{' '.join(base)}`; SGD learning rates "
        f"{', '.join(f'{lr:g}' for lr in learning_rates)}; {args.seeds} seed(s) each; "
        f"otherwise the default recipe  ",
        f"Wall time: {wall / 60:.0f} min for this invocation ({total} runs; "
        f"{trained / 60:.0f} min inside the runs' train())",
    ]
    written = write_study_report(
        args.report,
        render(variants, header),
        lambda png: plot(variants, png),
        "accuracy against learning rate per variant",
    )
    for variant in variants:
        print(f"{variant.name:<13} stable {describe_range(stable_range(variant.points))}")
    print("wrote " + " and ".join(str(path) for path in written))


if __name__ == "__main__":
    cli()
