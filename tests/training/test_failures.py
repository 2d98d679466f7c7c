"""Bad input: a readable /opt/ml/output/failure (its first line says what to fix), exit 1.

The settings are read in this process (`read_settings`, what `train` calls first); one real
`train` shows such an error reaching the failure file. Errors found later, inside a training
process, reach it the same way through `job.run_process`: test_device.py and test_pretrained.py
run those, test_rules.py the divergence stop. Data errors are checked on `find_images` in
test_data.py, pretrained-weights errors on `find_pretrained` in test_pretrained.py.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from container.sagemaker_env import OptMl
from container.training.checkpoint import save_checkpoint
from container.training.errors import ConfigError, ResourceError, failure_text
from container.training.settings import read_settings
from tests.conftest import FAST, Job, fails_with

CASES: dict[str, tuple[Callable[[Job], None], tuple[str, ...]]] = {
    "malformed hyperparameters.json": (
        lambda job: job.write_config("hyperparameters.json", '{"epochs": "2",'),
        ("hyperparameters.json is not valid JSON", "fix or remove the file"),
    ),
    "malformed inputdataconfig.json": (
        lambda job: job.write_config("inputdataconfig.json", "[train]"),
        ("inputdataconfig.json is not valid JSON",),
    ),
    "resourceconfig.json without hosts": (
        lambda job: job.write_config("resourceconfig.json", {"current_host": "algo-1"}),
        ("resourceconfig.json needs current_host", "hosts"),
    ),
    "bad learning rate": (
        lambda job: job.set_hyperparameters(FAST, lr="fast"),
        ("Hyperparameter lr='fast' is invalid", "Fix it in the job's hyperparameters"),
    ),
    "unknown optimizer": (
        lambda job: job.set_hyperparameters(FAST, optimizer="adam"),
        ("Hyperparameter optimizer='adam' is invalid", "'sgd' or 'adamw'"),
    ),
    "negative epochs": (
        lambda job: job.set_hyperparameters(FAST, epochs=-1),
        ("Hyperparameter epochs=-1 is invalid", "greater than or equal to 1"),
    ),
    "frozen epochs beyond epochs": (
        lambda job: job.set_hyperparameters(FAST, frozen_epochs=5),
        ("frozen_epochs=5 exceeds epochs=2",),
    ),
    "missing inputdataconfig.json": (
        lambda job: job.opt_ml.inputdataconfig_file.unlink(),
        ("inputdataconfig.json is missing", '{"train": {}, "valid": {}}'),
    ),
}


def test_a_config_error_fails_the_job_with_a_failure_file(job: Job) -> None:
    mutate, words = CASES["malformed hyperparameters.json"]
    mutate(job)
    fails_with(job, "ConfigError: ", *words)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_settings(tmp_path: Path, case: str) -> None:
    job = Job(OptMl(tmp_path))
    job.set_channels("train", "valid")
    job.set_hyperparameters(FAST)
    mutate, words = CASES[case]
    mutate(job)
    with pytest.raises(ConfigError) as raised:
        read_settings({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    first_line = str(raised.value).splitlines()[0]
    for word in words:
        assert word in first_line, first_line


def test_a_master_port_that_is_no_number(tmp_path: Path) -> None:
    Job(OptMl(tmp_path)).set_channels("train", "valid")
    with pytest.raises(ConfigError, match="MASTER_PORT='x' is not a port number"):
        read_settings({"SAGEMAKER_BASE_DIR": str(tmp_path), "MASTER_PORT": "x"})


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB filesystem: too small for the checkpoint below (4 MB)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_no_space_for_checkpoints(tiny_disk: Path) -> None:
    with pytest.raises(ResourceError) as raised:
        save_checkpoint(tiny_disk, {"model": {"weight": torch.zeros(2**20)}})
    message = str(raised.value)
    assert message.startswith(
        f"no space left for checkpoints in {tiny_disk}: a checkpoint needs 4 MB"
    )
    assert "VolumeSizeInGB" in message
    assert list(tiny_disk.iterdir()) == []  # no half-written checkpoint left behind


def test_the_failure_file_tells_a_user_error_from_a_bug() -> None:
    """A user-fixable error is `Name: message`; anything else says it is the image's bug, with
    the end of its traceback (the file SageMaker shows as the job's FailureReason)."""
    assert failure_text(ConfigError("Hyperparameter lr='fast' is invalid")) == (
        "ConfigError: Hyperparameter lr='fast' is invalid"
    )

    def broken() -> None:
        raise KeyError("num_classes")

    try:
        broken()
    except KeyError as exc:
        text = failure_text(exc)
    first, second, *tail = text.splitlines()
    assert first == "InternalError: KeyError: 'num_classes'"
    assert second.startswith("This is a bug in the training image, not in your data or settings")
    assert 'raise KeyError("num_classes")' in "\n".join(tail)
