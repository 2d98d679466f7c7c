"""Bad input: a readable /opt/ml/output/failure (its first line says what to fix), exit 1."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from container.sagemaker_env import MAX_FAILURE_CHARS
from tests.conftest import FAST, Job


def _fails_with(job: Job, *words: str, env: dict[str, str] | None = None) -> str:
    run = job.run(env)
    assert run.returncode == 1, run.stderr
    failure = job.failure()
    assert failure is not None, f"no failure file; stderr:\n{run.stderr}"
    assert len(failure) <= MAX_FAILURE_CHARS
    first_line = failure.splitlines()[0]
    for word in words:
        assert word in first_line, first_line
    assert "Traceback" not in failure
    assert not (job.opt_ml.model_dir / "model.pt").exists()
    return first_line


def _rm(*parts: str) -> Callable[[Job], None]:
    return lambda job: shutil.rmtree(job.opt_ml.data_dir.joinpath(*parts))


CASES: dict[str, tuple[Callable[[Job], None], tuple[str, ...]]] = {
    "malformed hyperparameters.json": (
        lambda job: job.write_config("hyperparameters.json", '{"epochs": "2",'),
        ("ConfigError", "hyperparameters.json is not valid JSON", "fix or remove the file"),
    ),
    "malformed inputdataconfig.json": (
        lambda job: job.write_config("inputdataconfig.json", "[train]"),
        ("ConfigError", "inputdataconfig.json is not valid JSON"),
    ),
    "resourceconfig.json without hosts": (
        lambda job: job.write_config("resourceconfig.json", {"current_host": "algo-1"}),
        ("ConfigError", "resourceconfig.json needs current_host", "hosts"),
    ),
    "bad learning rate": (
        lambda job: job.set_hyperparameters(FAST, lr="fast"),
        (
            "ConfigError",
            "Hyperparameter lr='fast' is invalid",
            "Fix it in the job's hyperparameters",
        ),
    ),
    "unknown optimizer": (
        lambda job: job.set_hyperparameters(FAST, optimizer="adam"),
        ("Hyperparameter optimizer='adam' is invalid", "'sgd' or 'adamw'"),
    ),
    "negative epochs": (
        lambda job: job.set_hyperparameters(FAST, epochs=-1),
        ("Hyperparameter epochs=-1 is invalid", "greater than or equal to 1"),
    ),
    "missing inputdataconfig.json": (
        lambda job: (job.opt_ml.inputdataconfig_file).unlink(),
        ("inputdataconfig.json is missing", '{"train": {}, "valid": {}}'),
    ),
    "missing valid channel": (
        lambda job: job.set_channels("train"),
        ("DataError", "required channel 'valid' is missing", "['train']"),
    ),
    "channel folder missing": (
        _rm("valid"),
        ("channel 'valid' has no folder at", "S3 prefix"),
    ),
    "empty channel": (
        lambda job: [shutil.rmtree(p) for p in job.opt_ml.channel_dir("train").iterdir()],
        ("channel 'train' has no images in class folders", "S3 prefix is wrong"),
    ),
    "one class": (
        lambda job: [
            shutil.rmtree(p) for p in sorted(job.opt_ml.channel_dir("train").iterdir())[1:]
        ],
        ("'train' has 1 class folder (001.Affenpinscher)", "at least two classes"),
    ),
    "class in valid but not in train": (
        _rm("train", "004.Akita"),
        ("channel 'valid' has class folders that 'train' lacks: 004.Akita",),
    ),
    "too many unreadable images": (
        lambda job: [
            (job.opt_ml.channel_dir("valid") / "002.Afghan_hound" / f"bad{n}.jpg").write_bytes(
                b"\xff\xd8 not a jpeg"
            )
            for n in range(3)
        ],
        ("channel 'valid': 3 of 27 images are unreadable", "max_bad_images=0.05", "bad0.jpg"),
    ),
    "pipe mode": (
        lambda job: job.set_channels("valid", train={"TrainingInputMode": "Pipe"}),
        ("channel 'train' uses Pipe mode", "use File or FastFile"),
    ),
    "frozen epochs beyond epochs": (
        lambda job: job.set_hyperparameters(FAST, frozen_epochs=5),
        ("frozen_epochs=5 exceeds epochs=2",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(job: Job, case: str) -> None:
    mutate, words = CASES[case]
    mutate(job)
    _fails_with(job, *words)


def test_pretrained_asked_for_but_nowhere_to_be_found(job: Job, tmp_path: Path) -> None:
    job.set_hyperparameters(FAST, pretrained=True)
    # An empty torch hub cache, and a network that refuses connections (network isolation).
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    _fails_with(
        job,
        "WeightsError",
        "pretrained=true but no resnet18 weights were found",
        "set pretrained=false",
        env=env,
    )


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB filesystem: far too small for a ResNet18 checkpoint (~90 MB with optimiser state)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_no_space_for_checkpoints(job: Job, tiny_disk: Path) -> None:
    job.write_config("checkpointconfig.json", {"LocalPath": str(tiny_disk), "S3Uri": "s3://b/c"})
    job.set_hyperparameters(FAST, epochs=1)
    run = job.run()
    assert run.returncode == 1, run.stderr
    failure = job.failure()
    assert failure is not None
    assert failure.startswith(f"ResourceError: no space left for checkpoints in {tiny_disk}")
    assert "VolumeSizeInGB" in failure
    assert list(tiny_disk.iterdir()) == []  # no half-written checkpoint left behind


def test_corrupt_baked_weights(job: Job, tmp_path: Path) -> None:
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / "resnet18-f37072fd.pth").write_bytes(b"\x00" * 64)
    job.set_hyperparameters(FAST, pretrained=True)
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    _fails_with(job, "WeightsError", "resnet18-f37072fd.pth do not load", env=env)
