"""Peak memory of data=custom on a photo-sized set: writes N RGB JPEGs (default 20,000 at
256x256, in 10 class folders, train/ and test/) once, then builds the run's data as
``stable-cnn-train data=custom`` does (torchvision's ImageFolder through
``data._target_``), in a fresh process, and prints the images decoded, the seconds and
the peak resident memory.

    python scripts/custom_data_memory.py                        # this checkout
    python scripts/custom_data_memory.py --code /path/to/old    # another stable-cnn checkout
    python scripts/custom_data_memory.py data.limit_train=2000  # any data override

The folder goes to --folder (default /tmp/stable-cnn-photos), reused by later calls.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LOADER = """
from torchvision.datasets import ImageFolder


def load(folder):
    return ImageFolder(f"{folder}/train"), ImageFolder(f"{folder}/test")
"""

MEASURE = """
import resource, sys, time
sys.path[:0] = [{code!r}, {folder!r}]
import torch
from hydra import compose, initialize_config_dir
from stable_cnn.cli.conf import config_dir
from stable_cnn.cli.train import parse_run_config
from stable_cnn.config import register_schemas
from stable_cnn.data.build import build_splits

register_schemas()
with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
    run = parse_run_config(compose("config", overrides={overrides!r}))
started = time.perf_counter()
splits = build_splits(run.data, torch.device("cpu"), run.trainer.seed)
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(f"{{splits.num_train}} train / {{splits.num_val}} val / {{splits.num_test}} test images "
      f"in {{seconds:.1f}} s, peak resident memory {{peak:.2f}} GiB")
"""


def write_photos(folder: Path, count: int, size: int) -> None:
    """``count`` smooth RGB pictures (gradients and a disc, like photos to JPEG), a fifth
    of them under test/, in 10 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size] / size
    for index in range(count):
        split = "test" if index % 5 == 0 else "train"
        target = folder / split / f"class_{index % 10}"
        target.mkdir(parents=True, exist_ok=True)
        colour = rng.uniform(0, 255, (3, 3))
        centre, radius = rng.uniform(0.2, 0.8, 2), rng.uniform(0.1, 0.3)
        disc = ((x - centre[0]) ** 2 + (y - centre[1]) ** 2) < radius**2
        pixels = np.stack([colour[c, 0] * x + colour[c, 1] * y for c in range(3)], -1) / 2
        pixels[disc] = colour[:, 2]
        Image.fromarray(pixels.astype(np.uint8)).save(target / f"{index}.jpg", quality=90)
    (folder / "done").write_text(f"{count} {size}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/stable-cnn-photos"))
    parser.add_argument("--code", type=Path, default=REPO, help="the stable-cnn checkout to run")
    parser.add_argument("overrides", nargs="*", help="stable-cnn-train overrides")
    args = parser.parse_args()
    folder = args.folder.absolute()
    made = (folder / "done").read_text().split() if (folder / "done").exists() else []
    if made != [str(args.images), str(args.size)]:
        write_photos(folder, args.images, args.size)
    (folder / "my_photos.py").write_text(LOADER)
    overrides = [
        "data=custom",
        "data._target_=my_photos.load",
        f"+data.folder={folder}",
        "trainer.device=cpu",
        *args.overrides,
    ]
    script = textwrap.dedent(
        MEASURE.format(code=str(args.code.absolute()), folder=str(folder), overrides=overrides)
    )
    env = {**os.environ, "PYTHONPATH": str(args.code.absolute())}
    print(f"{args.code}: {' '.join(overrides)}", flush=True)
    sys.exit(subprocess.run([sys.executable, "-c", script], env=env).returncode)


if __name__ == "__main__":
    main()
