"""Files from elsewhere are data: a checkpoint that names code (a callable of any
installed module, a file for timm to read) is refused in one line by everything that
rebuilds a model from it, until its user says trust_code=true."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from stable_cnn.cli.conf import trust_code
from stable_cnn.deploy.trained_model import load_trained_model
from stable_cnn.errors import ConfigError
from stable_cnn.state.checkpoint import FORMAT, CheckpointError
from stable_cnn.training.evaluation import load_for_evaluation

SHAPE = {"in_channels": 1, "num_classes": 10, "image_size": 28}
DATA = {"name": "fashion_mnist", "root": "data", "image_size": 28}


def crafted(tmp_path: Path, model_config: dict, data: dict = DATA) -> Path:
    """A checkpoint someone wrote by hand to make its reader run code of their choosing."""
    path = tmp_path / "crafted.pt"
    torch.save(
        {"format": FORMAT, "model_config": model_config, "config": {"data": data}, "model": {}},
        path,
    )
    return path


def test_a_callable_the_checkpoint_names_is_not_called(tmp_path: Path):
    marker = tmp_path / "made-by-the-checkpoint"
    path = crafted(
        tmp_path,
        {**SHAPE, "kind": "custom", "target": "os.makedirs", "kwargs": {"name": str(marker)}},
    )
    for load in (load_trained_model, lambda p: load_for_evaluation(p, None, "cpu")):
        with pytest.raises(CheckpointError, match=r"model\._target_=os\.makedirs.*trust_code=true"):
            load(path)
    assert not marker.exists()


def test_a_dataset_callable_is_named_before_anything_is_built(tmp_path: Path):
    data = {"name": "custom", "_target_": "os.makedirs", "root": ""}
    path = crafted(tmp_path, {**SHAPE, "kind": "custom", "target": "os.rmdir"}, data)
    with pytest.raises(CheckpointError) as refused:
        load_for_evaluation(path, None, "cpu")
    assert "model._target_=os.rmdir, data._target_=os.makedirs" in str(refused.value)


def test_timm_is_not_sent_to_read_a_file_the_checkpoint_names(tmp_path: Path):
    path = crafted(
        tmp_path,
        {
            **SHAPE,
            "kind": "timm",
            "name": "resnet10t",
            "kwargs": {"checkpoint_path": "/etc/shadow"},
        },
    )
    with pytest.raises(CheckpointError, match=r"\+model.checkpoint_path=/etc/shadow"):
        load_trained_model(path)


def test_trust_code_is_true_or_false():
    assert trust_code(True) and not trust_code(False)
    with pytest.raises(ConfigError, match="trust_code='yes' is not allowed"):
        trust_code("yes")
