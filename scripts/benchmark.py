"""Training throughput, side by side in one run: the bare-compute ceiling, the stable-cnn
loop, and the tutorial-style loop; plus, with --time-to-accuracy, the fast preset's
wall time to its test accuracy; or, with --search N alone, the wall time of an N-trial
Optuna search with the median pruner and without pruning, one after the other.

    python scripts/benchmark.py --quick                  # about a minute
    python scripts/benchmark.py --search 20              # pruning on and off, a few minutes
    python scripts/benchmark.py --width 32 --steps 200   # the figures in docs/benchmarks.md
    python scripts/benchmark.py --dataset cifar10-synthetic --width 64 --device cuda --compile \
        --cuda-graph --precisions fp16,bf16 --batch-size 512  # a GPU (scripts/gpu_check.sh)

The ceiling is forward + backward + clipped SGD step on batches already in memory, in
the model's fastest form on this machine. The stable-cnn loop is ``train_one_epoch`` on
the real data (tensor-resident, batch augmentation, TensorBoard logging). The
tutorial-style loop is a torchvision dataset with per-image transforms, a DataLoader
with 2 workers and fp32 (the tutorial's AMP is CUDA-only). No timing here is asserted by
a test: run it and read it.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stable_cnn.config import (
    ClippingConfig,
    CosineConfig,
    DataConfig,
    SGDConfig,
    SyntheticDataConfig,
)
from stable_cnn.data.build import build_splits
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import (
    FP32,
    Precision,
    Runtime,
    choose_memory_format,
    choose_precision,
    compile_model,
    cpu_has_native_bf16,
    describe_cpu,
    resolve_device,
)
from stable_cnn.training.captured_step import build_train_step
from stable_cnn.training.epoch import EpochLoop, EpochSettings, train_one_epoch
from stable_cnn.training.optimizers import build_optimizer
from stable_cnn.training.schedulers import build_schedule
from stable_cnn.training.step import autocast, optimizer_step
from stable_cnn.training.tracking import RunTracker

CLIP = ClippingConfig("norm", max_norm=1.0)


@dataclass
class Row:
    path: str
    precision: str
    channels_last: bool
    compiled: bool
    images_per_second: float


def data_config(args: argparse.Namespace, limit_train: int) -> DataConfig:
    if args.dataset == "cifar10-synthetic":  # CIFAR-10-shaped, for machines without the data
        return SyntheticDataConfig(
            name="synthetic",
            root=args.data_root,
            batch_size=args.batch_size,
            val_size=0,
            in_channels=3,
            image_size=32,
            crop_padding=4,
            mean=[0.5] * 3,
            std=[0.25] * 3,
            num_train=limit_train,
            num_test=args.batch_size,
        )
    return DataConfig(
        name="fashion_mnist",
        root=args.data_root,
        system_dir="/usr/share/datasets/fashion-mnist",
        batch_size=args.batch_size,
        val_size=0,
        limit_train=limit_train,
        limit_test=args.batch_size,
        crop_padding=2,
        mean=[0.2860],
        std=[0.3530],
    )


def new_model(config: DataConfig, width: int, runtime: Runtime) -> nn.Module:
    model = SmallCNN(in_channels=config.in_channels, num_classes=10, width=width)
    return model.to(runtime.device, memory_format=runtime.memory_format)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_compute(args, config: DataConfig, runtime: Runtime, compiled: bool) -> float:
    """Images/s of forward + backward + clipped SGD step on batches already in memory."""
    torch.manual_seed(0)
    model = new_model(config, args.width, runtime)
    network = compile_model(model, runtime.device) if compiled else model
    optimizer = build_optimizer(model, SGDConfig())
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler)
    shape = (args.batch_size, config.in_channels, config.image_size, config.image_size)
    batches = [
        (
            torch.randn(shape, device=runtime.device).contiguous(
                memory_format=runtime.memory_format
            ),
            torch.randint(0, 10, (args.batch_size,), device=runtime.device),
        )
        for _ in range(4)
    ]
    criterion = nn.CrossEntropyLoss()
    params = list(model.parameters())
    model.train()

    def steps(count: int) -> None:
        for step in range(count):
            images, labels = batches[step % len(batches)]
            with autocast(runtime.device, runtime.precision):
                loss = criterion(network(images), labels)
            optimizer_step(loss, params, optimizer, scaler, CLIP)

    steps(args.warmup + (20 if compiled else 0))
    synchronize(runtime.device)
    started = time.perf_counter()
    steps(args.steps)
    synchronize(runtime.device)
    return args.steps * args.batch_size / (time.perf_counter() - started)


def stable_cnn_loop(
    args, config: DataConfig, runtime: Runtime, compiled: bool, cuda_graph: bool = False
) -> float:
    """Images/s of a whole ``train_one_epoch`` (data, augmentation, step, logging); with
    ``cuda_graph`` the step is captured in a CUDA graph (trainer.cuda_graph=true)."""
    torch.manual_seed(0)
    data = build_splits(config, runtime.device, seed=0)
    model = new_model(config, args.width, runtime)
    network = compile_model(model, runtime.device) if compiled else model
    optimizer = build_optimizer(model, SGDConfig())
    schedule = build_schedule(optimizer, CosineConfig(), 3, len(data.train))
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.precision.use_grad_scaler)
    train_step = build_train_step(
        network,
        nn.CrossEntropyLoss(),
        optimizer,
        scaler,
        CLIP,
        runtime,
        2.0,
        cuda_graph,
        cycles_momentum=False,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        tracker = RunTracker(Path(run_dir))
        rates = []
        for epoch in range(2):  # the first epoch pays one-time costs (compile, allocator)
            loop = EpochLoop(train_step, data.train, schedule, tracker.log_step)
            stats, _ = train_one_epoch(loop, EpochSettings(50), epoch * len(data.train))
            rates.append(stats.images_per_second)
        tracker.close()
    return rates[-1]


def tutorial_loop(args, config: DataConfig, device: torch.device) -> float:
    """The tutorial's loop: per-image torchvision transforms, DataLoader, fp32 on CPU."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    if args.dataset == "cifar10-synthetic":
        dataset = datasets.FakeData(
            args.steps * args.batch_size,
            (3, 32, 32),
            10,
            transform=transforms.Compose(
                [
                    transforms.RandomCrop(32, padding=4),
                    transforms.RandomHorizontalFlip(),
                    transforms.ToTensor(),
                    transforms.Normalize([0.5] * 3, [0.25] * 3),
                ]
            ),
        )
    else:
        build_splits(config, torch.device("cpu"), seed=0)  # installs the offline copy if needed
        transform = transforms.Compose(
            [
                transforms.RandomCrop(28, padding=2),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize([0.2860], [0.3530]),
            ]
        )
        full = datasets.FashionMNIST(config.root, train=True, transform=transform)
        dataset = Subset(full, range((args.warmup + args.steps) * args.batch_size))
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=True,
    )
    torch.manual_seed(0)
    model = SmallCNN(in_channels=config.in_channels, num_classes=10, width=args.width).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    use_amp = device.type == "cuda"  # torch.cuda.amp in the tutorial: a no-op on CPU
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    model.train()
    seen, started = 0, None
    for epoch in range(2):
        for step, (images, labels) in enumerate(loader):
            if started is None and (epoch > 0 or step == args.warmup):
                synchronize(device)
                started, seen = time.perf_counter(), 0
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            with torch.autocast(device.type, enabled=use_amp):
                loss = criterion(model(images), labels)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            loss.item()  # the tutorial reads the loss every step
            seen += labels.shape[0]
            if started is not None and seen >= args.steps * args.batch_size:
                synchronize(device)
                return seen / (time.perf_counter() - started)
    synchronize(device)
    return seen / (time.perf_counter() - started)


def variants(args, device: torch.device) -> list[tuple[Precision, bool, bool]]:
    """(precision, channels_last, compile) combinations worth measuring here."""
    if args.precisions:
        amp = {"fp32": "off"}
        precisions = [choose_precision(amp.get(p, p), device) for p in args.precisions.split(",")]
    else:
        auto = choose_precision("auto", device)
        precisions = [FP32] if auto.name == "fp32" else [FP32, auto]
    # --quick measures only the layout that amp=auto's machine would train with.
    auto_layout = choose_memory_format(device, None) == torch.channels_last
    layouts = [auto_layout] if args.quick else [False, True]
    compiles = [False, True] if args.compile else [False]
    return [(p, cl, c) for p in precisions for cl in layouts for c in compiles]


def machine_description(device: torch.device) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    parts = [
        f"CPU {cpu} ({torch.get_num_threads()} threads; {describe_cpu()}; {bf16})",
        f"torch {torch.__version__}",
        f"device {device}",
    ]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return ", ".join(parts)


def time_to_accuracy(preset: str, data_root: str) -> dict:
    """Run the preset through the real CLI; its results.json has test_acc and wall_s."""
    with tempfile.TemporaryDirectory() as run_dir:
        command = [
            sys.executable,
            "-m",
            "stable_cnn.train",
            f"experiment={preset}",
            f"data.root={data_root}",
            "trainer.progress_bar=false",
            f"hydra.run.dir={run_dir}",
        ]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
        results = json.loads((Path(run_dir) / "results.json").read_text())
    return {**results, "process_wall_s": wall}


def search_wall_time(trials: int, pruner: str, data_root: str, out: Path) -> dict:
    """An Optuna search through the real CLI on a few thousand Fashion-MNIST images, the
    sampler seeded (both searches start from the same trials); its wall time, the trials
    by state and the epochs all its trials trained."""
    folder = out / pruner
    command = [
        sys.executable,
        "-m",
        "stable_cnn.train",
        "-m",
        "hparams_search=optuna",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.pruner={pruner}",
        "hydra.sweeper.seed=0",
        f"hydra.sweeper.study_name=pruner-{pruner}",
        f"hydra.callbacks.sweep.report_root={folder}",
        f"data.root={data_root}",
        "data.limit_train=4000",
        "trainer.epochs=6",
        "trainer.progress_bar=false",
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=out)
    wall = time.perf_counter() - started
    study = json.loads((folder / "study.json").read_text())
    epochs = sum(len(p.read_text().splitlines()) for p in folder.glob("*/*/metrics.jsonl"))
    return {
        "wall_s": wall,
        "states": study["states"],
        "best": study["best_value"],
        "epochs": epochs,
    }


def compare_pruning(trials: int, data_root: str) -> None:
    print(f"\n{machine_description(torch.device('cpu'))}")
    print(f"{trials}-trial search, stock space, 4,000 Fashion-MNIST images, 6 epochs a trial\n")
    print("| pruner | wall (s) | epochs trained | trials | best val acc (%) |")
    print("|---|---:|---:|---|---:|")
    with tempfile.TemporaryDirectory() as out:
        for pruner in ("median", "none"):
            found = search_wall_time(trials, pruner, str(Path(data_root).resolve()), Path(out))
            states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(found["states"].items()))
            print(
                f"| {pruner} | {found['wall_s']:.0f} | {found['epochs']} | {states} | "
                f"{found['best']:.2f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dataset", choices=["fashion_mnist", "cifar10-synthetic"], default="fashion_mnist"
    )
    parser.add_argument("--data-root", default="./data")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precisions",
        metavar="LIST",
        help="comma-separated fp32,fp16,bf16,auto (default: fp32 and auto)",
    )
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="also measure the loop with the step in a CUDA graph (CUDA only)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer rows and steps (~1 min)")
    parser.add_argument(
        "--time-to-accuracy",
        metavar="PRESET",
        nargs="?",
        const="fashion_mnist_fast",
        help="also run this preset",
    )
    parser.add_argument(
        "--search",
        metavar="TRIALS",
        type=int,
        help="only this: an Optuna search with and without pruning",
    )
    args = parser.parse_args()
    if args.search:
        compare_pruning(args.search, args.data_root)
        return
    if args.quick:
        args.steps = min(args.steps, 30)
    device = resolve_device(args.device)
    config = data_config(args, limit_train=args.steps * args.batch_size)

    rows = []
    for precision, channels_last, compiled in variants(args, device):
        layout = torch.channels_last if channels_last else torch.contiguous_format
        runtime = Runtime(device, precision, layout)
        for path, measure in (("ceiling", bare_compute), ("stable-cnn loop", stable_cnn_loop)):
            rate = measure(args, config, runtime, compiled)
            rows.append(Row(path, precision.name, channels_last, compiled, rate))
            print(
                f"  {path:16s} {precision.name} cl={channels_last} compile={compiled}: "
                f"{rate:,.0f} img/s",
                file=sys.stderr,
            )
        if args.cuda_graph and not compiled and not precision.use_grad_scaler:
            rate = stable_cnn_loop(args, config, runtime, False, cuda_graph=True)
            rows.append(
                Row("stable-cnn loop, CUDA graph", precision.name, channels_last, False, rate)
            )
            print(f"  loop, CUDA graph {precision.name}: {rate:,.0f} img/s", file=sys.stderr)
    rows.append(
        Row("tutorial-style loop", "fp32", False, False, tutorial_loop(args, config, device))
    )

    best = max(r.images_per_second for r in rows if r.path == "ceiling")
    print(f"\n{machine_description(device)}")
    print(
        f"SmallCNN width {args.width}, {args.dataset}, batch {args.batch_size}, "
        f"{args.steps} timed steps per row\n"
    )
    print("| path | precision | channels_last | compile | images/s | vs best ceiling |")
    print("|---|---|---|---|---:|---:|")
    for r in rows:
        print(
            f"| {r.path} | {r.precision} | {'yes' if r.channels_last else 'no'} | "
            f"{'yes' if r.compiled else 'no'} | {r.images_per_second:,.0f} | "
            f"{r.images_per_second / best:.0%} |"
        )
    if args.time_to_accuracy:
        result = time_to_accuracy(args.time_to_accuracy, args.data_root)
        print(
            f"\nexperiment={args.time_to_accuracy}: test_acc {result['test_acc']:.2f}% after "
            f"{result['epochs']} epochs; training {result['wall_s']:.0f} s, whole command "
            f"{result['process_wall_s']:.0f} s"
        )


if __name__ == "__main__":
    main()
