"""The package installs like a product: configs shipped, lint clean, no tutorial leftovers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.mark.slow
def test_non_editable_install_ships_the_configs(tmp_path: Path):
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    shipped = {
        p.relative_to(target / "stable_cnn") for p in target.glob("stable_cnn/conf/**/*.yaml")
    }
    assert shipped == {p.relative_to(REPO) for p in REPO.glob("conf/**/*.yaml")}
    assert (target / "hydra_plugins" / "stable_cnn_optuna" / "__init__.py").is_file()  # the sweeper
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-m", "stable_cnn.train", "--cfg", "job", "scheduler=plateau"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "name: plateau" in done.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import stable_cnn.cli.train as t; print(t.config_dir())"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert where.stdout.strip().startswith(str(target))


def test_no_tutorial_leftovers_in_the_package():
    """The tutorial used the deprecated torch.cuda.amp and hard-coded .cuda() calls."""
    for path in (REPO / "stable_cnn").rglob("*.py"):
        source = path.read_text()
        assert "torch.cuda.amp" not in source, path
        assert ".cuda()" not in source, path


def test_ruff_lint_and_format_are_clean():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        pytest.skip("ruff is not installed: pip install -e '.[dev]'")
    for command in ([str(ruff), "check", "."], [str(ruff), "format", "--check", "."]):
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
