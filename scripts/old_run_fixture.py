"""Record a run of an earlier stable-cnn as a test fixture: check the version out, start a
small run with it, stop it (SIGTERM) after its first epoch, and keep its run folder, so
that tests/test_old_runs.py can show today's stable-cnn resuming it. The run trains on
Fashion-MNIST as the built-in dataset, as an image folder of its images written as PNG
files, or through data=custom (tests/fixtures/user_code/fashion_pairs.py).

    python scripts/old_run_fixture.py COMMIT      # tests/fixtures/old_runs/<date>-<commit>/
    python scripts/old_run_fixture.py COMMIT --data image_folder   # ...-<commit>-image_folder/

Run from the repository root with the venv's python; the commit's own code is imported
(its checkout goes first on PYTHONPATH), with today's installed packages.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "old_runs"
# A run small enough to keep in the repository (width 4: a 40 KB checkpoint) and long
# enough (three epochs of 2,048 images) that the signal lands while it trains.
OVERRIDES = [
    "data.limit_train=2048",
    "data.limit_test=256",
    "data.val_size=256",
    "model.width=4",
    "trainer.epochs=3",
    "trainer.progress_bar=false",
    "diagnostics.figures_every_n_epochs=null",
]
USER_CODE = REPO / "tests" / "fixtures" / "user_code"
# Each source's overrides, its data under the run's working folder (``data``: a link to
# the folder holding FashionMNIST/raw; ``images``: the image folder), so that the
# resuming test gives the same config in another place.
SOURCES = {
    "fashion_mnist": ["data.root=data"],
    "image_folder": [
        "data=image_folder",
        "data.root=images",
        "model.width=4",
        "trainer.epochs=5",
        "trainer.progress_bar=false",
        "diagnostics.figures_every_n_epochs=null",
    ],
    "custom": [
        "data=custom",
        "data._target_=fashion_pairs.load",
        "+data.folder=data",
        *OVERRIDES,
    ],
}
SOURCES["fashion_mnist"] += OVERRIDES
FOLDER_IMAGES = {"train_per_class": 300, "val_per_class": 30}  # PNGs of each class


def stopped_run(checkout: Path, source: str, run_dir: Path) -> None:
    """Train with the code in ``checkout`` until the first epoch is logged, then SIGTERM."""
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{USER_CODE}"}
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        *SOURCES[source],
        f"hydra.run.dir={run_dir}",
    ]
    process = subprocess.Popen(
        command,
        cwd=run_dir.parents[2],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    metrics = run_dir / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().strip()):
        if process.poll() is not None:
            sys.exit(f"the run ended before its first epoch:\n{process.stdout.read()}")
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    if not (run_dir / "checkpoints" / "last.pt").exists() or (run_dir / "results.json").exists():
        sys.exit(f"the run did not stop with a checkpoint:\n{output}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="a landed commit of stable-cnn")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="a folder holding FashionMNIST/raw (default: data)",
    )
    parser.add_argument("--data", choices=sorted(SOURCES), default="fashion_mnist")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "rev-parse", "--short", args.commit],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    date = subprocess.run(
        ["git", "show", "-s", "--format=%ad", "--date=format:%Y-%m-%d", commit],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as scratch:
        checkout = Path(scratch) / "checkout"
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(checkout), commit],
            cwd=REPO,
            check=True,
            capture_output=True,
        )
        try:
            run_dir = Path(scratch) / "outputs" / date / "12-00-00"
            run_dir.parent.mkdir(parents=True)
            (Path(scratch) / "data").symlink_to(args.data_root.absolute())
            if args.data == "image_folder":
                sys.path.insert(0, str(REPO))
                from tests.test_resume import write_fashion_folder

                counts = FOLDER_IMAGES.values()
                write_fashion_folder(Path(scratch) / "images", args.data_root.absolute(), *counts)
            stopped_run(checkout, args.data, run_dir)
        finally:
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(checkout)], cwd=REPO, check=True
            )
        name = f"{date}-{commit}" + ("" if args.data == "fashion_mnist" else f"-{args.data}")
        kept = FIXTURES / name
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(run_dir, kept, ignore=shutil.ignore_patterns("*.lock"))
        if args.data == "image_folder":  # how to write the folder again
            (kept / "image_folder.json").write_text(json.dumps(FOLDER_IMAGES) + "\n")
    print(f"wrote {kept.relative_to(REPO)}")


if __name__ == "__main__":
    main()
