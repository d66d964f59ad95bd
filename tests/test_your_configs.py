"""docs/configuration.md "Your own configs", run as it is written: its files written
into a working folder, then its commands run there one by one, as a user would, with
the outputs a user would look at checked."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

DOC = REPO / "docs" / "configuration.md"
# Added to each training command: no progress bar, and a smaller share of Fashion-MNIST
# than the example's presets take (the checks are about the configs, not the accuracy).
SMALLER = [
    "trainer.progress_bar=false",
    "data.limit_train=640",
    "data.limit_test=256",
    "data.val_size=128",
]


def worked_example() -> tuple[dict[str, str], list[str]]:
    """The section's files (each block's first comment names it) and commands."""
    section = DOC.read_text().split("## Your own configs", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.DOTALL)
    files = {  # "# my_conf/model/gn_net.yaml: ...", after the @package line where there is one
        block.removeprefix("# @package _global_\n").split(":", 1)[0].removeprefix("# "): block
        for language, block in blocks
        if language in ("python", "yaml")
    }
    (commands,) = (block for language, block in blocks if language == "bash")
    return files, [line.split("  #")[0].strip() for line in commands.strip().splitlines()]


def test_your_config_folder_trains_searches_and_is_listed(tmp_path: Path, fashion_mnist_root):
    files, commands = worked_example()
    assert set(files) >= {"mynets.py", "my_conf/model/gn_net.yaml"}, files
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "data").symlink_to(fashion_mnist_root)  # ./data: where the runs look
    bin_dir = Path(os.sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("STABLE_CNN_DATA", "PYTHONPATH")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    outputs = []
    for command in commands:
        words = shlex.split(command)
        extra = {}
        while "=" in words[0] and not words[0].startswith("-"):  # PYTHONPATH=. before it
            key, value = words.pop(0).split("=", 1)
            extra[key] = value
        done = subprocess.run(
            [*words, *SMALLER] if "--help" not in words else words,
            cwd=tmp_path,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
        outputs.append(done.stdout + done.stderr)
    help_text, longer, gn_quick, search = outputs
    listed = {}  # the groups' lines, which come before the config's own "model:"
    for line in help_text.splitlines():
        listed.setdefault(line.split(":")[0].strip(), line)
    assert "smoke_longer" in listed["experiment"] and "gn_quick" in listed["experiment"]
    assert "gn_net" in listed["model"] and "small_cnn" in listed["model"]
    assert "deeper" in listed["hparams_search"] and "optuna" in listed["hparams_search"]
    assert "epoch 3/3" in longer, "ours, one key changed"
    assert "model mynets.GNNet(num_classes=10, depth=3): its constructor takes no " in gn_quick
    assert "in_channels or image_size" in gn_quick and "epoch 2/2" in gn_quick
    trials = [path.parent for path in tmp_path.glob("outputs/optuna/**/results.json")]
    depths = {
        yaml.safe_load((trial / ".hydra" / "config.yaml").read_text())["model"]["depth"]
        for trial in trials
    }
    assert len(trials) == 2 and depths <= {2, 3}, search[-3000:]
    assert all("model.depth=" in trial.name for trial in trials), "the key of mine, named"
