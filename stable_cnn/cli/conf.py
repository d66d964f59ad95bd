"""Where the commands find conf/."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """conf/ at the repository root (source checkout, editable install), else the copy
    shipped inside the package (``pip install .``)."""
    package = Path(__file__).resolve().parents[1]  # stable_cnn/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {package}: reinstall stable-cnn")
