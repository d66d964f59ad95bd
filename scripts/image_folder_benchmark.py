"""Image folders at tensor speed, measured: training img/s of ``data=image_folder`` with
each ``data.cache``, beside the loop a user writes by hand (torchvision ImageFolder +
DataLoader with per-image transforms, workers sized to the cores, the same SmallCNN in
a bare loop at amp=auto's precision), in one run on one machine.

    python scripts/image_folder_benchmark.py --images 40000   # JPEGs made from Fashion-MNIST
    python scripts/image_folder_benchmark.py --folder /path/to/images  # train/ val/ [test/]

On a GPU (scripts/gpu_check.sh runs it there) both train on it; the plain loop's
DataLoader then pins its batches and copies them without waiting, as a user's would.

The folder made from Fashion-MNIST (its 70,000 images, the first N of them) holds RGB
JPEGs at --size pixels, 3/4 in train/, 1/8 each in val/ and test/; it is kept under
--out and reused by the next run. Each stable-cnn run is the real command for
--epochs epochs (figures off); its img/s per epoch comes from metrics.jsonl, its
whole-command seconds include decoding. No timing here is asserted by a test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from stable_cnn.config import DataConfig
from stable_cnn.data.build import build_splits
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import choose_precision, describe_cpu, usable_cores

CLASSES = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "boot",
)


def make_folder(out: Path, images: int, size: int, data_root: str, system_dir: str) -> Path:
    """The first ``images`` Fashion-MNIST images as RGB JPEGs in class folders (made once)."""
    from PIL import Image

    folder = out / f"fashion_mnist_{images}_{size}px"
    done = folder / ".complete"
    if done.exists():
        return folder
    config = DataConfig(
        name="fashion_mnist", root=data_root, system_dir=system_dir, val_size=0, augment=False
    )
    splits = build_splits(config, torch.device("cpu"), seed=0)
    pixels = torch.cat([splits.train.images, splits.test.images])[:images, 0].numpy()
    labels = torch.cat([splits.train.labels, splits.test.labels])[:images].tolist()
    if len(labels) < images:
        sys.exit(f"--images {images}: Fashion-MNIST has {len(labels)} images")
    train_end, val_end = images * 3 // 4, images * 7 // 8

    def write(index: int) -> None:
        split = "train" if index < train_end else "val" if index < val_end else "test"
        path = folder / split / CLASSES[labels[index]] / f"{index}.jpg"
        image = Image.fromarray(pixels[index]).convert("RGB").resize((size, size))
        image.save(path, quality=90)

    for split in ("train", "val", "test"):
        for name in CLASSES:
            (folder / split / name).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(usable_cores()) as pool:
        list(pool.map(write, range(images)))
    print(f"made {folder}: {images} JPEGs in {time.perf_counter() - started:.0f} s", flush=True)
    done.touch()
    return folder


def stable_cnn_run(folder: Path, cache: str, epochs: int, size: int, cache_dir: Path) -> dict:
    """The real command on the folder; its img/s per epoch and its whole-command seconds.
    Its disk cache goes under ``cache_dir`` (not into a folder of the user's)."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "-m",
            "stable_cnn.train",
            "data=image_folder",
            f"data.root={folder}",
            f"data.cache={cache}",
            f"data.cache_dir={cache_dir}",
            f"data.image_size={size}",
            f"trainer.epochs={epochs}",
            "trainer.progress_bar=false",
            "diagnostics.figures_every_n_epochs=null",
            f"hydra.run.dir={run_dir}",
        ]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            sys.exit(f"data.cache={cache} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        per_epoch = [json.loads(line)["train_img_s"] for line in lines]
    return {"img_s": per_epoch, "seconds": seconds}


def plain_loop(folder: Path, epochs: int, batch_size: int, size: int) -> dict:
    """What a user writes by hand: ImageFolder with per-image transforms (resized to
    ``size`` first), a DataLoader with a worker per core, the same model, amp=auto's
    precision, on the GPU where there is one; training only."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.RandomCrop(size, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.25] * 3),
        ]
    )
    train = datasets.ImageFolder(str(folder / "train"), transform=transform)
    loader = DataLoader(
        train,
        batch_size=batch_size,
        shuffle=True,
        num_workers=usable_cores(),
        drop_last=True,
        persistent_workers=True,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, num_classes=len(train.classes), width=16)
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    precision = choose_precision("auto", device)
    model.train()
    per_epoch = []
    started_all = time.perf_counter()
    for _ in range(epochs):
        started, seen = time.perf_counter(), 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True, memory_format=torch.channels_last)
            labels = labels.to(device, non_blocking=True)
            dtype = precision.dtype
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = criterion(model(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seen += len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the epoch's work done, not only queued
        per_epoch.append(seen / (time.perf_counter() - started))
    return {"img_s": per_epoch, "seconds": time.perf_counter() - started_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=40_000, help="images in the made folder")
    parser.add_argument(
        "--size",
        type=int,
        default=32,
        help="pixels per side: the made images and the training size",
    )
    parser.add_argument("--folder", type=Path, help="a folder of yours instead (train/ val/ test/)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--data-root", default="data", help="where Fashion-MNIST is (or goes)")
    parser.add_argument(
        "--system-dir",
        default="/usr/share/datasets/fashion-mnist",
        help="Debian's Fashion-MNIST files (dataset-fashion-mnist)",
    )
    parser.add_argument(
        "--caches", default="auto,memory,disk,none", help="data.cache values to measure"
    )
    args = parser.parse_args()
    folder = args.folder or make_folder(
        args.out, args.images, args.size, args.data_root, args.system_dir
    )
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "CPU",
    )
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    print(
        f"machine: {cpu} ({describe_cpu()}), {usable_cores()} cores{gpu}, torch {torch.__version__}"
    )
    rows = []
    for cache in args.caches.split(","):
        rows.append(
            (
                f"data=image_folder data.cache={cache}",
                stable_cnn_run(folder, cache, args.epochs, args.size, args.out / "cache"),
            )
        )
        print(rows[-1], flush=True)
    rows.append(
        (
            "plain ImageFolder + DataLoader loop (training only)",
            plain_loop(folder, args.epochs, 128, args.size),
        )
    )
    print(rows[-1], flush=True)
    plain = rows[-1][1]["img_s"][-1]
    print("\n| path | train img/s per epoch | last epoch vs plain loop | whole command |")
    print("|---|---|---|---|")
    for name, figures in rows:
        per_epoch = ", ".join(f"{value:,.0f}" for value in figures["img_s"])
        ratio = figures["img_s"][-1] / plain
        print(f"| {name} | {per_epoch} | {ratio:.2f}x | {figures['seconds']:.1f} s |")


if __name__ == "__main__":
    main()
