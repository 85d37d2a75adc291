"""The version is written once (src/torchfreeze/_version.py) and shown everywhere."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import torch

import torchfreeze as tfz
from torchfreeze.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    hits = [p for p in (ROOT / "src").rglob("*.py") if re.search(
        r"^__version__\s*=", p.read_text(), flags=re.M)]
    assert [p.name for p in hits] == ["_version.py"]


def test_changelog_newest_release_is_the_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[([^\]]+)\]", text, flags=re.M)
    assert releases[0] == "Unreleased"
    assert releases[1] == tfz.__version__


def test_cli_version(capsys) -> None:
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"torchfreeze {tfz.__version__} (torch {torch.__version__}, Python ")


def test_cli_version_entry_point() -> None:
    run = subprocess.run([sys.executable, "-m", "torchfreeze.cli", "--version"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:2] == ["torchfreeze", tfz.__version__]
