"""Where the commands find conf/, and the options the commands that read a checkpoint share."""

from __future__ import annotations

from pathlib import Path

from stable_cnn.errors import ConfigError


def config_dir() -> str:
    """conf/ at the repository root (source checkout, editable install), else the copy
    shipped inside the package (``pip install .``)."""
    package = Path(__file__).resolve().parents[1]  # stable_cnn/
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"no conf/config.yaml next to {package}: reinstall stable-cnn")


def trust_code(value: object) -> bool:
    """The ``trust_code=`` of eval, export and predict: true or false, else one line."""
    if not isinstance(value, bool):
        raise ConfigError(
            f"trust_code={value!r} is not allowed: use trust_code=true (import and call the "
            f"model or data code the checkpoint names) or trust_code=false"
        )
    return value
