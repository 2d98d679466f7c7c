"""Starting weights: a `pretrained` channel, a named file, weights baked into the image.

Where the weights come from is `find_pretrained`'s choice, checked in this process; real `train`
runs show the weights found reach the model, and the errors reach the failure file.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
import torch

from container.model import build, load_artifact
from container.sagemaker_env import Channel, OptMl
from container.training.errors import WeightsError
from container.training.pretrained import WeightsSource, find_pretrained
from tests.conftest import FAST, Job, fails_with

# Train only the head, on fixed inputs: the backbone in the artifact is then exactly the
# starting weights, which proves they were loaded (BatchNorm statistics included).
HEAD_ONLY = {**FAST, "pretrained": True, "frozen_epochs": 2, "augment": False}
BAKED = Path("hub") / "checkpoints" / "resnet18-f37072fd.pth"
"""Where the image bakes torchvision's ImageNet weights, under its TORCH_HOME."""


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


def _find(
    tmp_path: Path, weights_name: str | None = None, channel: Path | None = None
) -> WeightsSource:
    """What `train` would start from, with `channel` as its pretrained channel and
    tmp_path/torch as its TORCH_HOME."""
    return find_pretrained(
        "resnet18",
        weights_name,
        None if channel is None else Channel(name="pretrained", path=channel),
        tmp_path / "torch" / "hub",
        tmp_path / "scratch",
    )


def _assert_same(found: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert found.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(found[key], value), key


def test_pretrained_channel_weights_become_the_backbone(job: Job) -> None:
    expected = _imagenet_like(job.opt_ml.channel_dir("pretrained") / "resnet18-imagenet.pth")
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "Starting weights: file " in run.stderr
    assert "Cached backbone features for the frozen epochs" in run.stderr
    assert job.meta()["pretrained_from"].endswith("resnet18-imagenet.pth")
    trained = load_artifact(job.opt_ml.model_dir).model.state_dict()
    # Only the head learned; the backbone, BatchNorm statistics included, is the file's.
    for key, value in expected.items():
        if not key.startswith("fc.") and not key.endswith("num_batches_tracked"):
            assert torch.equal(trained[key], value), key
    torch.manual_seed(FAST.get("seed", 42))
    initial = build("resnet18", 4).state_dict()
    assert not torch.equal(trained["fc.weight"], initial["fc.weight"])


def test_weights_named_by_hyperparameter_among_other_files(tmp_path: Path) -> None:
    channel = tmp_path / "pretrained"
    _imagenet_like(channel / "other.pt", seed=1)
    expected = _imagenet_like(channel / "chosen.pt", seed=2)
    found = _find(tmp_path, "chosen.pt", channel)
    assert found.origin == f"file {channel / 'chosen.pt'}"
    _assert_same(found.state_dict, expected)

    absolute = tmp_path / "elsewhere" / "weights.pth"  # and no pretrained channel
    expected = _imagenet_like(absolute, seed=3)
    _assert_same(_find(tmp_path, str(absolute)).state_dict, expected)


def test_two_candidate_files_without_a_name_is_an_error(tmp_path: Path) -> None:
    channel = tmp_path / "pretrained"
    _imagenet_like(channel / "a.pt")
    _imagenet_like(channel / "b.pt")
    with pytest.raises(WeightsError) as raised:
        _find(tmp_path, channel=channel)
    assert "must hold one .pt/.pth state_dict" in str(raised.value)
    assert "pretrained_weights hyperparameter" in str(raised.value)


def test_model_tar_gz_of_an_earlier_job(trained: OptMl, tmp_path: Path) -> None:
    """Fine-tune again from a previous job's model.tar.gz, uploaded as the pretrained channel."""
    channel = tmp_path / "pretrained"
    channel.mkdir()
    with tarfile.open(channel / "model.tar.gz", "w:gz") as tf:
        for file in trained.model_dir.iterdir():
            tf.add(file, arcname=file.name)  # flat, as SageMaker packs /opt/ml/model
    found = _find(tmp_path, channel=channel)
    _assert_same(found.state_dict, load_artifact(trained.model_dir).model.state_dict())


def test_weights_baked_into_the_image(tmp_path: Path) -> None:
    expected = _imagenet_like(tmp_path / "torch" / BAKED)
    found = _find(tmp_path)
    assert found.origin.startswith("image's ImageNet weights ")
    _assert_same(found.state_dict, expected)


def test_corrupt_baked_weights(tmp_path: Path) -> None:
    baked = tmp_path / "torch" / BAKED
    baked.parent.mkdir(parents=True)
    baked.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match=r"resnet18-f37072fd.pth do not load"):
        _find(tmp_path)


def test_pretrained_asked_for_but_nowhere_to_be_found(job: Job, tmp_path: Path) -> None:
    """A process of its own: torch.hub's download reads the proxy from the environment."""
    job.set_hyperparameters(FAST, pretrained=True)
    # An empty torch hub cache, and a network that refuses connections (network isolation).
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "https_proxy": "http://127.0.0.1:9",
        "HTTPS_PROXY": "http://127.0.0.1:9",
    }
    fails_with(
        job,
        "WeightsError",
        "pretrained=true but no resnet18 weights were found",
        "set pretrained=false",
        env=env,
    )


def test_weights_of_another_architecture_are_refused(job: Job) -> None:
    _imagenet_like(job.opt_ml.channel_dir("pretrained") / "resnet18.pth")
    job.set_channels("train", "valid", "pretrained")
    job.set_hyperparameters(HEAD_ONLY, arch="resnet34")
    fails_with(job, "WeightsError: ", "right architecture")
