"""`launch transform --instance-type local`: the real `launch` process runs a batch transform of the
real image in the SDK's local mode (docker compose), on local files, with no AWS account at all.

Host port 8080 is held during the runs: the command must serve the container on a port of its own.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from container.class_names import class_name
from container.sagemaker_env import OptMl
from tests.conftest import ROOT
from tests.container.conftest import containers_of
from tests.launch.conftest import Launch, one_line_error

RunLaunch = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="module")
def model_tar(trained: OptMl, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained model as a training job hands it over: model.tar.gz of /opt/ml/model."""
    tar_path = tmp_path_factory.mktemp("artifact") / "model.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for path in sorted(trained.model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    return tar_path


@pytest.fixture
def no_aws(sagemaker_sdk_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The environment of a user with no AWS variables, no AWS config and a HOME of their own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    home = tmp_path / "home"
    home.mkdir()
    return {**env, **sagemaker_sdk_env, "HOME": str(home), "PYTHONPATH": str(ROOT)}


@pytest.fixture
def run_launch(no_aws: dict[str, str], tmp_path: Path, image: str) -> Iterator[RunLaunch]:
    """`launch transform --instance-type local --image-uri IMAGE ...` as a process of its own, for
    such a user, while something else holds host port 8080."""

    def launch(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "launch", "transform", "--instance-type", "local", *args],
            cwd=tmp_path,
            env=no_aws,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 8080))
        taken.listen()
        yield launch
    left = containers_of(image)
    assert not left, f"local mode left containers behind: {left}"


def _ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


def _table(stdout: str) -> dict[str, tuple[int, int]]:
    """The accuracy table's rows: class -> (images, correct)."""
    rows = re.findall(r"^(.+?)\s+(\d+)\s+(\d+)\s+[\d.]+%\s+\d+\s", stdout, re.MULTILINE)
    return {label: (int(images), int(correct)) for label, images, correct in rows}


def test_a_folder_of_class_folders_is_transformed_and_scored(
    run_launch: RunLaunch, image: str, model_tar: Path, dataset: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"
    shutil.copytree(dataset / "test", inputs)
    (inputs / "notes.jpg").write_bytes(b"not an image")  # outside class folders: no truth
    out = tmp_path / "out"
    done = run_launch(
        "--image-uri", image,
        "--model-data", str(model_tar),
        "--input", str(inputs),
        "--download", str(out),
    )  # fmt: skip
    stdout = _ok(done)
    relatives = sorted(p.relative_to(inputs).as_posix() for p in inputs.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.out")) == [
        f"{r}.out" for r in relatives
    ]
    assert "Completed" in stdout
    assert f"{len(relatives)} outputs in {out}/ ({len(relatives)} inputs in {inputs})" in stdout
    # The server's 400 for the bad file is what local mode wrote as its output.
    assert json.loads((out / "notes.jpg.out").read_text())["error"]
    assert "1 outputs are not predictions, e.g. notes.jpg.out" in stdout

    expected: dict[str, tuple[int, int]] = {}
    for folder in sorted(p for p in inputs.iterdir() if p.is_dir()):
        truth = class_name(folder.name)
        tops = [
            json.loads((out / folder.name / f"{jpeg.name}.out").read_text())["predictions"][0]
            for jpeg in folder.iterdir()
        ]
        assert all(0.0 <= top["probability"] <= 1.0 for top in tops)
        expected[truth] = (len(tops), sum(top["label"] == truth for top in tops))
    expected["all"] = (sum(n for n, _ in expected.values()), sum(k for _, k in expected.values()))
    assert _table(stdout) == expected
    assert expected["all"][1] > 0  # the model learned something: the comparison is not vacuous


def test_a_model_folder_and_a_flat_folder(
    run_launch: RunLaunch,
    image: str,
    trained: OptMl,
    dataset: Path,
    tmp_path: Path,
) -> None:
    inputs = tmp_path / "flat"
    inputs.mkdir()
    for jpeg in sorted((dataset / "test").rglob("*.jpg"))[:2]:
        shutil.copy(jpeg, inputs / jpeg.name)
    model = str(trained.model_dir)
    stdout = _ok(run_launch("--image-uri", image, "--model-data", model, "--input", str(inputs)))
    name = re.search(r"transform job (\S+): Completed", stdout)
    assert name, stdout
    outs = sorted((tmp_path / "transform-output" / name.group(1)).iterdir())
    assert [p.name for p in outs] == sorted(f"{p.name}.out" for p in inputs.iterdir())
    assert "the inputs are not in class folders (NNN.Class_Name/): no accuracy" in stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--image-uri", "byoc:no-such-tag", "--model-data", "{model}", "--input", "{input}"],
            "launch: image byoc:no-such-tag is not in the local docker engine: build it",
        ),
        (
            ["--image-uri", "{image}", "--model", "dog-model", "--input", "{input}"],
            "launch: --instance-type local runs a local model: pass --model-data PATH",
        ),
        (
            ["--image-uri", "{image}", "--model-data", "{model}", "--input", "{input}/none"],
            "launch: --input {input}/none: there is no such file or folder",
        ),
        (
            ["--image-uri", "{image}", "--model-data", "{model}"],
            "launch: --instance-type local needs --input with a local path",
        ),
        (
            [
                "--image-uri",
                "{image}",
                "--model-data",
                "{model}",
                "--input",
                "{input}",
                "--no-wait",
            ],
            "launch: --instance-type local runs the job in this process: drop --no-wait",
        ),
    ],
)
def test_what_local_mode_cannot_run_is_one_line(
    no_aws: dict[str, str],
    image: str,
    model_tar: Path,
    tmp_path: Path,
    args: list[str],
    message: str,
) -> None:
    """Refused before any container starts: `launch.cli.main` in this process (the runs above are
    the real process)."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "dog.jpg").write_bytes(b"unread: refused before")
    fill = {"model": str(model_tar), "input": str(inputs), "image": image}
    launch = Launch(no_aws, tmp_path, common=[])
    done = launch("transform", "--instance-type", "local", *(a.format(**fill) for a in args))
    assert one_line_error(done).startswith(message.format(**fill))
