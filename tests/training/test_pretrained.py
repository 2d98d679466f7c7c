"""Starting weights: a `pretrained` channel, a named file, weights baked into the image."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from container.model import build, load_artifact
from container.sagemaker_env import OptMl
from tests.conftest import FAST, Job

# Train only the head, on fixed inputs: the backbone in the artifact is then exactly the
# starting weights, which proves they were loaded (BatchNorm statistics included).
HEAD_ONLY = {**FAST, "pretrained": True, "frozen_epochs": 2, "augment": False}


def _imagenet_like(path: Path, seed: int = 7) -> dict[str, torch.Tensor]:
    """A stand-in for ImageNet weights: a 1000-class ResNet18 state_dict, made here."""
    torch.manual_seed(seed)
    state = build("resnet18", 1000).state_dict()
    for key, value in state.items():
        if key.endswith("running_mean"):
            value.normal_()  # non-default statistics, so loading them is visible
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _assert_backbone(job: Job, expected: dict[str, torch.Tensor]) -> None:
    trained = load_artifact(job.opt_ml.model_dir).model.state_dict()
    for key, value in expected.items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(trained[key], value), key
    assert trained["fc.weight"].shape == (4, 512)


def test_pretrained_channel(job: Job) -> None:
    expected = _imagenet_like(job.opt_ml.channel_dir("pretrained") / "resnet18-imagenet.pth")
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "Starting weights: file " in run.stderr
    _assert_backbone(job, expected)
    assert job.meta()["pretrained_from"].endswith("resnet18-imagenet.pth")


def test_weights_named_by_hyperparameter_among_other_files(job: Job, tmp_path: Path) -> None:
    channel = job.opt_ml.channel_dir("pretrained")
    _imagenet_like(channel / "other.pt", seed=1)
    expected = _imagenet_like(channel / "chosen.pt", seed=2)
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY, pretrained_weights="chosen.pt")
    assert job.run().returncode == 0
    _assert_backbone(job, expected)

    absolute = _imagenet_like(tmp_path / "elsewhere" / "weights.pth", seed=3)
    job.set_channels("train", "valid")
    job.set_hyperparameters(
        HEAD_ONLY, pretrained_weights=str(tmp_path / "elsewhere" / "weights.pth")
    )
    for file in (job.base / "checkpoints").iterdir():
        file.unlink()
    assert job.run().returncode == 0
    _assert_backbone(job, absolute)


def test_two_candidate_files_without_a_name_is_an_error(job: Job) -> None:
    channel = job.opt_ml.channel_dir("pretrained")
    _imagenet_like(channel / "a.pt")
    _imagenet_like(channel / "b.pt")
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY)
    assert job.run().returncode == 1
    failure = job.failure()
    assert failure is not None
    assert "must hold one .pt/.pth state_dict" in failure
    assert "pretrained_weights hyperparameter" in failure


def test_model_tar_gz_of_an_earlier_job(job: Job, tmp_path: Path) -> None:
    """Fine-tune again from a previous job's model.tar.gz, uploaded as the pretrained channel."""
    job.set_hyperparameters(FAST)
    assert job.run().returncode == 0
    earlier = load_artifact(job.opt_ml.model_dir).model.state_dict()
    archive = job.opt_ml.channel_dir("pretrained") / "model.tar.gz"
    archive.parent.mkdir(parents=True)
    with tarfile.open(archive, "w:gz") as tf:
        for file in job.opt_ml.model_dir.iterdir():
            tf.add(file, arcname=file.name)  # flat, as SageMaker packs /opt/ml/model

    second = Job(OptMl(tmp_path / "second"))
    second.base.mkdir()
    (second.base / "input").symlink_to(job.base / "input")
    second.set_channels("train", "valid", "pretrained")
    second.set_hyperparameters(HEAD_ONLY)
    run = second.run()
    assert run.returncode == 0, run.stderr
    _assert_backbone(second, earlier)


def test_weights_baked_into_the_image(job: Job, tmp_path: Path) -> None:
    torch_home = tmp_path / "torch"
    expected = _imagenet_like(torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    job.set_hyperparameters(HEAD_ONLY)
    run = job.run({"TORCH_HOME": str(torch_home)})
    assert run.returncode == 0, run.stderr
    assert "Starting weights: image's ImageNet weights" in run.stderr
    _assert_backbone(job, expected)


@pytest.mark.parametrize("arch", ["resnet34"])
def test_weights_of_another_architecture_are_refused(job: Job, arch: str) -> None:
    _imagenet_like(job.opt_ml.channel_dir("pretrained") / "resnet18.pth")
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY, arch=arch)
    assert job.run().returncode == 1
    failure = job.failure()
    assert failure is not None
    assert failure.startswith("WeightsError: ")
    assert "right architecture" in failure
