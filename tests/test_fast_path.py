"""The fast path (tensor-resident data, batch augmentation, channels_last) changes speed,
not results: same images as torchvision, the classic augmentation's statistics, same
outputs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from stable_cnn.data.augment import normalize, random_crop, random_flip
from stable_cnn.data.build import build_splits
from stable_cnn.data.datasets import load_tensors
from stable_cnn.models.small_cnn import SmallCNN
from stable_cnn.system.hardware import FP32, Runtime
from stable_cnn.training.evaluation import evaluate
from tests.conftest import compose_run

CPU = Runtime(torch.device("cpu"), FP32, torch.contiguous_format)


@pytest.mark.parametrize("train", [True, False])
def test_tensor_path_holds_exactly_torchvisions_images_and_labels(fashion_mnist_root, train):
    from torchvision import datasets, transforms

    run = compose_run([f"data.root={fashion_mnist_root}", "data.download=false"])
    images, labels, classes = load_tensors(run.data, train=train)
    reference = datasets.FashionMNIST(
        str(fashion_mnist_root), train=train, transform=transforms.PILToTensor()
    )
    assert images.shape == (len(reference), 1, 28, 28) and images.dtype == torch.uint8
    assert classes == tuple(reference.classes)
    for index in torch.randint(
        0, len(reference), (200,), generator=torch.Generator().manual_seed(0)
    ):
        image, label = reference[int(index)]
        assert torch.equal(images[index], image) and labels[index] == label


def test_crop_offsets_are_uniform_over_the_padded_range():
    padding, count = 2, 25_000
    # Each image is its own position marker: a single bright pixel at the centre.
    images = torch.zeros(count, 1, 9, 9, dtype=torch.uint8)
    images[:, :, 4, 4] = 255
    cropped = random_crop(images, padding, torch.Generator().manual_seed(0))
    where = cropped.flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert torch.all(cropped.flatten(1).amax(1) == 255), "the marker never leaves the window"
    counts = torch.bincount(rows * 9 + cols, minlength=81).float()
    offsets = counts[counts > 0]
    assert len(offsets) == (2 * padding + 1) ** 2
    expected = count / len(offsets)
    chi_square = ((offsets - expected) ** 2 / expected).sum().item()
    assert chi_square < 60, "uniform over the 25 offsets (p < 1e-4 for 24 d.o.f. above 60)"


def test_flip_rate_is_one_half():
    images = torch.arange(4, dtype=torch.uint8).view(1, 1, 1, 4).expand(20_000, 1, 1, 4)
    flipped = random_flip(images, torch.Generator().manual_seed(0))
    rate = (flipped[:, 0, 0, 0] == 3).float().mean().item()
    assert rate == pytest.approx(0.5, abs=0.015)


@pytest.mark.parametrize("flip", [False, True])
def test_no_flip_where_the_data_config_forbids_it(flip: bool):
    assert compose_run(["data=mnist"]).data.flip is False
    assert compose_run(["data=svhn"]).data.flip is False
    run = compose_run(["data=synthetic", f"data.flip={flip}", "data.crop_padding=0"])
    batches = build_splits(run.data, torch.device("cpu"), seed=0).train
    originals = {
        normalize(image[None], batches.mean, batches.std).numpy().tobytes()
        for image in batches.images
    }
    seen = [image[None].numpy().tobytes() for images, _ in batches for image in images]
    unchanged = sum(image in originals for image in seen) / len(seen)
    assert unchanged == 1.0 if not flip else 0.35 < unchanged < 0.65


def test_channels_last_model_gives_the_same_outputs():
    torch.manual_seed(0)
    model = SmallCNN(in_channels=3, width=8).eval()
    images = torch.randn(16, 3, 32, 32)
    expected = model(images)
    model = model.to(memory_format=torch.channels_last)
    actual = model(images.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_evaluation_is_identical_through_tensors_and_an_image_folder(tmp_path):
    """Same images as PNG files through the DataLoader path: the same accuracy and loss."""
    run = compose_run(["data=synthetic", "data.val_size=0"])
    images, labels, _ = load_tensors(run.data, train=False)
    for split in ("train", "val"):
        for k, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = tmp_path / split / f"class_{int(label)}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image[0].numpy()).save(folder / f"{k:04d}.png")
    folder_run = compose_run(
        [
            "data=image_folder",
            f"data.root={tmp_path}",
            "data.in_channels=1",
            "data.image_size=28",
            "data.mean=[0.5]",
            "data.std=[0.25]",
            "data.num_workers=0",
            "data.batch_size=64",
        ]
    )
    from_tensors = build_splits(run.data, torch.device("cpu"), seed=0)
    from_files = build_splits(folder_run.data, torch.device("cpu"), seed=0)
    assert from_files.info.class_names == tuple(f"class_{k}" for k in range(10))
    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, width=8)
    tensor_stats = evaluate(model, from_tensors.test, CPU)
    file_stats = evaluate(model, from_files.test, CPU)
    assert file_stats.images == tensor_stats.images == len(labels)
    assert file_stats.accuracy == tensor_stats.accuracy
    assert file_stats.loss == pytest.approx(tensor_stats.loss, rel=1e-5)


def test_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    import shutil

    from stable_cnn.system.hardware import compile_model

    monkeypatch.setattr(shutil, "which", lambda name: None)  # a machine without a C compiler
    model = SmallCNN(width=8)
    assert compile_model(model, torch.device("cpu")) is model
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "C compiler" in warnings[0]


@pytest.mark.slow
def test_benchmark_script_prints_its_table(fashion_mnist_root):
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "benchmark.py"),
            "--quick",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--width",
            "8",
            "--data-root",
            str(fashion_mnist_root),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    paths = {line.split("|")[1].strip() for line in table[1:]}
    assert paths == {"ceiling", "stable-cnn loop", "tutorial-style loop"}
    assert "torch " in done.stdout and "CPU" in done.stdout
