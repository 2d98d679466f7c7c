"""`pip install '.[launch]'` on a laptop: a venv without torch whose `launch` works.

The venv is made once per session from the repository (a real, non-editable install with the
project's constraints), and its console script is run from a folder outside the repository, so
what runs is what a user would have installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import COMMANDS
from tests.conftest import ROOT
from tests.launch.conftest import Launch

_INSTALL_TIMEOUT_S = 900


@pytest.fixture(scope="session")
def laptop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only `.[launch]` installed; its bin/ folder."""
    base = tmp_path_factory.mktemp("laptop")
    # pip builds in the source tree (a build/ folder): build from a copy of what a wheel holds.
    source = base / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("container", "launch"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = base / "venv"
    # This venv's pip installs into the new one (pip --python), which needs no pip of its own;
    # the modules are byte-compiled when first imported, not all of them at install.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    subprocess.run(
        [
            *pip,
            "--quiet",
            "--no-compile",
            "--disable-pip-version-check",
            "-c",
            str(ROOT / "constraints.txt"),
            f"{source}[launch]",
        ],
        check=True,
        timeout=_INSTALL_TIMEOUT_S,
    )
    return venv / "bin"


def _run(laptop: Path, launch: Launch, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in launch.env.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{laptop}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        list(args), cwd=launch.cwd, env=env, capture_output=True, text=True, check=False
    )


def test_the_laptop_install_has_no_torch(laptop: Path, launch: Launch) -> None:
    done = _run(laptop, launch, "python", "-c", "import torch")
    assert done.returncode == 1
    assert "No module named 'torch'" in done.stderr
    where = _run(laptop, launch, "python", "-c", "import launch; print(launch.__file__)")
    assert str(laptop.parent) in where.stdout, "the installed package, not the repository"


def test_every_command_starts(laptop: Path, launch: Launch) -> None:
    top = _run(laptop, launch, "launch", "--help")
    assert top.returncode == 0, top.stderr
    assert all(name in top.stdout for name in COMMANDS)
    # Every command's own parser, in one process (each `launch` start imports the SDK: ~3 s).
    script = (
        "import sys\nfrom launch.cli import COMMANDS, main\n"
        "for name in COMMANDS:\n"
        "    try:\n"
        "        main([name, '--help'])\n"
        "    except SystemExit as exc:\n"
        "        assert exc.code == 0, (name, exc.code)\n"
        "    else:\n"
        "        sys.exit(f'{name} --help did not exit')\n"
        "print('checked', len(COMMANDS))\n"
    )
    done = _run(laptop, launch, "python", "-c", script)
    assert done.returncode == 0, done.stderr
    assert f"checked {len(COMMANDS)}" in done.stdout


def test_a_command_against_aws(laptop: Path, launch: Launch, bucket: str, dataset: Path) -> None:
    done = _run(laptop, launch, "launch", "upload-data", str(dataset), "--bucket", bucket)
    assert done.returncode == 0, done.stderr
    listed = launch.client("s3").list_objects_v2(Bucket=bucket)
    assert listed["KeyCount"] > 0
    assert "train s3://" in done.stdout
