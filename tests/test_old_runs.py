"""Runs written by earlier stable-cnn versions resume: each fixture in fixtures/old_runs/
is the folder of a real run that a landed version started and SIGTERM stopped after its
first epoch (scripts/old_run_fixture.py made them; none is written by hand), on
Fashion-MNIST, on an image folder of its images (before data.cache), or through
data=custom (before data.cache replaced data.in_memory). Today's stable-cnn-train, given
the run's own overrides and trainer.resume=auto, finds it and finishes it in its own
folder, reading its images as the run started."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, run_cli
from tests.test_resume import write_fashion_folder

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "old_runs"
OLD_RUNS = sorted(FIXTURES.iterdir())


def test_there_are_runs_of_the_last_two_landed_versions():
    assert len(OLD_RUNS) >= 2


@pytest.mark.parametrize("old_run", OLD_RUNS, ids=lambda path: path.name)
def test_a_run_of_an_earlier_version_resumes(
    old_run: Path, fashion_mnist_root: Path, tmp_path: Path
):
    date = old_run.name[:10]
    run_dir = tmp_path / "outputs" / date / "12-00-00"
    shutil.copytree(old_run, run_dir)
    saved = torch.load(old_run / "checkpoints" / "last.pt", weights_only=True)
    overrides = yaml.safe_load((old_run / ".hydra" / "overrides.yaml").read_text())
    source = saved["config"]["data"]["name"]
    (tmp_path / "data").symlink_to(fashion_mnist_root)  # data.root=data, +data.folder=data
    if source == "image_folder":  # the same PNG files, written again
        counts = json.loads((old_run / "image_folder.json").read_text()).values()
        write_fashion_folder(tmp_path / "images", fashion_mnist_root, *counts)
    overrides = [  # runs before 2026-12-02 named the data's absolute path
        "data.root=data" if o.startswith("data.root=") and source == "fashion_mnist" else o
        for o in overrides
    ]
    user_code = Path(__file__).parent / "fixtures" / "user_code"  # data=custom's callable
    done = run_cli(
        [*overrides, "trainer.resume=auto"],
        tmp_path,
        env={"PYTHONPATH": f"{user_code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"},
        module=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "resuming from" in output, output
    epochs = saved["config"]["trainer"]["epochs"]
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [entry["epoch"] for entry in metrics] == list(range(1, epochs + 1))
    if saved["progress"] is None:  # stopped between epochs: the next began on its rate
        assert metrics[1]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    assert json.loads((run_dir / "results.json").read_text())["test_acc"] > 30
    assert [p for p in (tmp_path / "outputs").glob("*/*") if p != run_dir] == []
    # it went on with the images it started on, as its version drew them (the first N
    # before data.sampling)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    drawn = saved["config"]["data"].get("sampling", "first")
    assert state["config"]["data"]["sampling"] == drawn
    resolved = state["data_resolved"]
    if source == "image_folder":  # per image, with the ImageNet statistics it set
        assert resolved["cache"] == "none" and "loader workers" in output, output
        assert resolved["mean"] == [0.485, 0.456, 0.406]
    if source == "custom":  # in memory, as its data.in_memory=null had settled
        assert "decoding 2304 + 256 images into memory" in output, output
