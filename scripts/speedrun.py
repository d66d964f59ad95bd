"""The speedrun's frontier: test accuracy against the whole command's wall time, each
point a ``stable-cnn-train`` command line run for several seeds, one after another.

    python scripts/speedrun.py                      # every point, seeds 0 1 2 (about 35 min)
    python scripts/speedrun.py --points speedrun    # the preset alone
    python scripts/speedrun.py --seeds 0 --points speedrun speedrun_with_sgd
    python scripts/speedrun.py --from speedrun.jsonl --plot docs/speedrun.png  # no runs

Prints a markdown table (docs/speedrun.md's) and writes the raw figures to
``--out`` (speedrun.jsonl). Nothing else may run on the machine meanwhile: the figures
are wall times. Compare them only within one run on one machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from stable_cnn.system.hardware import describe_cpu
from stable_cnn.system.plotting import pyplot

FAST = ["experiment=fashion_mnist_fast"]  # the SGD preset: width 16, 1-pixel crops, flip TTA
MUON = [*FAST, "optimizer=muon", "optimizer.lr=0.1"]
SPEEDRUN = ["experiment=fashion_mnist_speedrun"]  # MUON for 4 epochs

# name -> the command line's overrides: the frontier, then the preset's ingredients
POINTS: dict[str, list[str]] = {
    "sgd_6_epochs": FAST,
    "muon_3_epochs": [*MUON, "trainer.epochs=3"],
    "muon_4_epochs": [*MUON, "trainer.epochs=4"],
    "muon_4_epochs_wd": [*MUON, "trainer.epochs=4", "optimizer.weight_decay=0.01"],
    "muon_5_epochs": [*MUON, "trainer.epochs=5"],
    "muon_5_epochs_wd": [*MUON, "trainer.epochs=5", "optimizer.weight_decay=0.01"],
    "muon_6_epochs": MUON,
    "speedrun": SPEEDRUN,
    # one ingredient changed at a time
    "speedrun_with_sgd": [*SPEEDRUN, "optimizer=sgd"],
    "speedrun_muon_lr_0.05": [*SPEEDRUN, "optimizer.lr=0.05"],
    "speedrun_no_flip_tta": [*SPEEDRUN, "data.tta_flip=false"],
    "speedrun_crop_2": [*SPEEDRUN, "data.crop_padding=2"],
    "speedrun_translate_tta": [*SPEEDRUN, "data.tta_translate=1"],
    "speedrun_mixup": [*SPEEDRUN, "data.mixup_alpha=0.2"],
    "speedrun_cutmix": [*SPEEDRUN, "data.cutmix_alpha=1.0"],
}


def run_point(overrides: list[str], seed: int, folder: Path) -> dict:
    """One whole ``stable-cnn-train`` command, timed from launch to exit."""
    script = str(Path(sys.executable).parent / "stable-cnn-train")
    command = [
        script,
        *overrides,
        f"trainer.seed={seed}",
        "trainer.progress_bar=false",
        f"hydra.run.dir={folder}",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    results = json.loads((folder / "results.json").read_text())
    return {
        "seed": seed,
        "command_s": seconds,
        "train_s": results["wall_s"],
        "test_acc": results["test_acc"],
    }


def table(rows: dict[str, list[dict]]) -> str:
    """The markdown table of docs/speedrun.md: one line per point, in ``rows``' order."""
    lines = [
        "| point | command | test acc: mean (seeds 0, 1, 2) | whole command, mean |",
        "|---|---|---:|---:|",
    ]
    for name, runs in rows.items():
        accs = [r["test_acc"] for r in runs]
        seconds = statistics.mean(r["command_s"] for r in runs)
        each = ", ".join(f"{a:.2f}" for a in accs)
        overrides = " ".join(POINTS[name]) if name in POINTS else "(no longer in POINTS)"
        lines.append(
            f"| {name} | `stable-cnn-train {overrides}` | "
            f"{statistics.mean(accs):.2f}% ({each}) | {seconds:.1f} s |"
        )
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], path: Path) -> None:
    """Test accuracy against the whole command's seconds: each seed a dot, each point's
    mean a cross, the 93% line."""
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: no plot")
        return
    figure, axes = plt.subplots(figsize=(7.5, 4.5))
    for name, runs in rows.items():
        seconds = [r["command_s"] for r in runs]
        accs = [r["test_acc"] for r in runs]
        dots = axes.scatter(seconds, accs, s=14, alpha=0.5)
        mean_s, mean_acc = statistics.mean(seconds), statistics.mean(accs)
        axes.scatter([mean_s], [mean_acc], marker="x", s=60, color=dots.get_facecolor()[0])
        axes.annotate(
            name, (mean_s, mean_acc), textcoords="offset points", xytext=(5, 4), fontsize=7
        )
    axes.axhline(93.0, color="grey", linestyle="--", linewidth=0.8)
    axes.set_xlabel("whole stable-cnn-train command, seconds")
    axes.set_ylabel("Fashion-MNIST test accuracy, %")
    axes.set_title(
        f"Fashion-MNIST, each seed (dot) and their mean (cross); CPU: {describe_cpu()}", fontsize=8
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", nargs="+", default=list(POINTS), choices=list(POINTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("speedrun.jsonl"))
    parser.add_argument(
        "--from",
        dest="recorded",
        nargs="+",
        type=Path,
        default=None,
        help="run nothing: the table (and --plot) from these .jsonl files",
    )
    parser.add_argument("--plot", type=Path, default=None, help="also draw the points here")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {}
    if args.recorded:
        for path in args.recorded:
            for line in path.read_text().splitlines():
                run = json.loads(line)
                if run["point"] in args.points:
                    rows.setdefault(run.pop("point"), []).append(run)
    else:
        print(f"# {describe_cpu()}", flush=True)
        with tempfile.TemporaryDirectory() as scratch, args.out.open("a") as out:
            for name in args.points:
                runs = [
                    run_point(POINTS[name], seed, Path(scratch) / f"{name}-{seed}")
                    for seed in args.seeds
                ]
                for run in runs:
                    out.write(json.dumps({"point": name, **run}) + "\n")
                rows[name] = runs
                accs = ", ".join(f"{r['test_acc']:.2f}%" for r in runs)
                print(
                    f"{name}: {accs}; {statistics.mean(r['command_s'] for r in runs):.1f} s",
                    flush=True,
                )
    print(table(rows))
    if args.plot is not None:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
