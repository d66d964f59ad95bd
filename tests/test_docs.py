"""The guide cannot go stale: every config key is in the configuration reference, every
link in the README and docs/ resolves, and the README stays a README."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import yaml

from stable_cnn.config import SCHEMAS
from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
GROUP_OF = {"schema_amp": "amp", "schema_ema": "ema"}  # the rest: by the schema's module


def group_of(schema_name: str, schema: type) -> str:
    return GROUP_OF.get(schema_name) or schema.__module__.rsplit(".", 1)[-1]


def test_every_config_key_is_in_the_configuration_reference():
    reference = (REPO / "docs" / "configuration.md").read_text()
    missing = []
    for name, schema in SCHEMAS.items():
        group = group_of(name, schema)
        for field in fields(schema):
            key = (
                group
                if field.name == "name" and group in ("amp", "ema")
                else (f"{group}.{field.name}")
            )
            if f"`{key}`" not in reference:
                missing.append(key)
    assert not missing, f"docs/configuration.md lacks {sorted(set(missing))}"


def test_help_lists_only_keys_the_reference_has_and_no_synthetic_keys(tmp_path: Path):
    """What `stable-cnn-train --help` shows (the default data group's keys among them)."""
    done = subprocess.run(
        [sys.executable, "-m", "stable_cnn.train", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    config = yaml.safe_load(
        done.stdout.split("== Config ==")[1]
        .split("\n\n", 1)[1]
        .split("Examples:")[0]
        .rsplit("\n", 2)[0]
    )
    reference = (REPO / "docs" / "configuration.md").read_text()
    keys = [
        f"{group}.{key}"
        for group, values in config.items()
        if isinstance(values, dict)
        for key in values
    ]
    assert len(keys) > 40
    named_by_the_group = ("amp.name", "ema.name")  # `amp=...`, `ema=...`
    missing = [key for key in keys if f"`{key}`" not in reference and key not in named_by_the_group]
    assert not missing, missing
    assert "num_train" not in done.stdout, "data=synthetic's keys are synthetic's alone"


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


def test_every_link_in_the_readme_and_the_guide_resolves():
    broken = []
    for page in PAGES:
        for target in LINK.findall(page.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_the_readme_fits_a_newcomer():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    first = [line for line in readme.splitlines()[3:5] if line.strip()]
    assert first[0].startswith("bash scripts/setup.sh && .venv/bin/stable-cnn-train")
    assert first[1].startswith("bash scripts/setup.sh --dev && .venv/bin/python -m pytest")
    linked = set(LINK.findall(readme))
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in linked, f"the README's guide does not link {page.name}"
