"""Runs written by earlier stable-cnn versions resume: each fixture in fixtures/old_runs/
is the folder of a real run that a landed version started and SIGTERM stopped after its
first epoch (scripts/old_run_fixture.py made them; none is written by hand). Today's
stable-cnn-train, given the run's own overrides and trainer.resume=auto, finds it and
finishes it in its own folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import read_jsonl, run_cli

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
    overrides = [o for o in overrides if not o.startswith("data.root=")]
    done = run_cli(
        [*overrides, f"data.root={fashion_mnist_root}", "trainer.resume=auto"],
        tmp_path,
        module=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "resuming from" in output, output
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert [entry["epoch"] for entry in metrics] == [1, 2, 3]
    if saved["progress"] is None:  # stopped between epochs: the next began on its rate
        assert metrics[1]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    assert json.loads((run_dir / "results.json").read_text())["test_acc"] > 30
    assert [p for p in (tmp_path / "outputs").glob("*/*") if p != run_dir] == []
    # it went on with the images it started on: the first N, as its version drew them
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["data"]["sampling"] == "first"
