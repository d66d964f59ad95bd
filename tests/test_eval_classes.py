"""stable-cnn-eval on other data matches classes by name: a Fashion-MNIST checkpoint (a
real run of an earlier version, tests/fixtures/old_runs) tested on an image folder of the
same test images, whose class folders list the classes alphabetically and spell
T-shirt/top as T-shirt_top, scores what it scores on Fashion-MNIST itself; a folder of
other classes is refused in one line that shows both lists."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from torchvision.datasets import FashionMNIST

from tests.test_export import command

pytestmark = pytest.mark.slow

OLD_RUN = sorted(  # the newest Fashion-MNIST run (image_folder and custom ones are named so)
    path
    for path in (Path(__file__).parent / "fixtures" / "old_runs").iterdir()
    if re.fullmatch(r"[0-9-]{10}-[0-9a-f]+", path.name)
)[-1]
IMAGES = 256  # the run's data.limit_test: its first 256 test images (data.sampling=first)


def image_folder(root: Path, fashion_mnist_root: Path, rename: dict[str, str]) -> Path:
    """The first test images as PNG files, one folder per class (train/ and val/ alike)."""
    test = FashionMNIST(str(fashion_mnist_root), train=False)
    for split in ("train", "val"):
        for index in range(IMAGES):
            image, label = test[index]
            name = test.classes[label].replace("/", "_")
            folder = root / split / rename.get(name, name)
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index}.png")
    return root


def test_eval_on_an_image_folder_matches_classes_by_name(fashion_mnist_root: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    checkpoint = f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}"
    own = command("stable-cnn-eval", checkpoint, f"data.root={fashion_mnist_root}", cwd=tmp_path)
    assert own.returncode == 0, own.stdout + own.stderr
    expected = json.loads((run_dir / "eval" / "last-fashion_mnist" / "eval.json").read_text())
    assert expected["images"] == IMAGES

    same = image_folder(tmp_path / "same", fashion_mnist_root, {})
    folder = [
        "data=image_folder",
        f"data.root={same}",
        "data.in_channels=1",
        "data.image_size=28",
        "data.mean=[0.2860]",
        "data.std=[0.3530]",
    ]
    done = command(
        "stable-cnn-eval", checkpoint, *folder, f"out={tmp_path / 'folder'}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "names the checkpoint's classes in another order: matched by name" in done.stdout
    result = json.loads((tmp_path / "folder" / "eval.json").read_text())
    assert result["images"] == IMAGES
    # at most one image apart: a near-tie of this one-epoch model may round the other way
    assert abs(result["test_acc"] - expected["test_acc"]) <= 100 / IMAGES
    assert list(result["per_class_acc"])[:2] == ["Ankle boot", "Bag"]  # the folder's order

    other = image_folder(tmp_path / "other", fashion_mnist_root, {"Bag": "Backpack"})
    refused = command(
        "stable-cnn-eval",
        checkpoint,
        *folder[:1],
        f"data.root={other}",
        *folder[2:],
        f"out={tmp_path / 'refused'}",
        cwd=tmp_path,
    )
    lines = [line for line in (refused.stdout + refused.stderr).splitlines() if "error" in line]
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert "'Backpack'" in lines[0] and "'Bag'" in lines[0] and "same classes" in lines[0]
    assert not (tmp_path / "refused").exists()


def test_eval_reads_the_runs_data_where_this_machine_keeps_it(
    fashion_mnist_root: Path, tmp_path: Path
):
    """The checkpoint names the folder its run read (here edited to point elsewhere, as a
    file from someone else might): eval neither writes there nor reads from there, but
    takes this installation's Fashion-MNIST (the system copy, into ./data)."""
    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(OLD_RUN, run_dir)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    state = torch.load(checkpoint, weights_only=True)
    elsewhere = tmp_path / "elsewhere"
    state["config"]["data"]["root"] = str(elsewhere)
    torch.save(state, checkpoint)
    done = command("stable-cnn-eval", f"checkpoint={checkpoint}", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not elsewhere.exists()
    assert (
        json.loads((run_dir / "eval" / "last-fashion_mnist" / "eval.json").read_text())["images"]
        == IMAGES
    )
