"""The model artifact: what `train` writes and `serve` reads."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from container.abstention import Override, Policy
from container.class_names import class_name
from container.decoding import Preprocessing
from container.model import (
    META_FILE,
    ArtifactError,
    backbone,
    build,
    load_artifact,
    load_backbone_weights,
    save_artifact,
)
from container.serving.predictor import find_model_dir, load_predictor


@pytest.mark.parametrize(
    ("folder", "name"),
    [
        ("001.Affenpinscher", "Affenpinscher"),
        ("043.Canaan_dog", "Canaan dog"),
        ("125.Lhasa_apso", "Lhasa apso"),
        ("cats", "cats"),
        ("7-Seven_up", "Seven up"),
        ("2001", "2001"),
    ],
)
def test_class_names(folder: str, name: str) -> None:
    assert class_name(folder) == name


def _save(directory: Path, arch: str = "resnet18") -> dict[str, object]:
    torch.manual_seed(0)
    model = build(arch, 3)
    return save_artifact(
        directory,
        model.state_dict(),
        arch=arch,
        classes=["a", "b", "c"],
        preprocessing=Preprocessing.for_image_size(64),
        extra_meta={"metrics": {"val_acc": 0.5}},
    )


def test_round_trip(tmp_path: Path) -> None:
    meta = _save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "classes.json",
        "model.pt",
        "model_meta.json",
    ]
    artifact = load_artifact(tmp_path)
    assert artifact.classes == ["a", "b", "c"]
    assert artifact.preprocessing == Preprocessing.for_image_size(64)
    assert artifact.model_version == meta["model_version"]
    assert str(meta["model_version"]).startswith("resnet18-")
    assert not artifact.model.training
    torch.manual_seed(0)
    expected = build("resnet18", 3).state_dict()
    for key, value in artifact.model.state_dict().items():
        torch.testing.assert_close(value, expected[key])


def test_an_older_artifact_still_loads_and_serves(tmp_path: Path) -> None:
    """Artifacts written before 2026-12 carry `preprocessing.version`, which nothing reads now."""
    _save(tmp_path)
    meta_file = tmp_path / "model_meta.json"
    meta = json.loads(meta_file.read_text())
    meta["preprocessing"]["version"] = 1
    meta_file.write_text(json.dumps(meta))
    predictor = load_predictor(tmp_path, tmp_path / "scratch", "cpu", "fp32", False, 1)
    assert predictor.prep == Preprocessing.for_image_size(64)
    [outputs] = predictor.predict([torch.zeros(64, 64, 3, dtype=torch.uint8)])
    answer = predictor.answer(outputs, Override())
    assert answer.probabilities.shape == (3,)
    assert not answer.abstained  # no calibration, no threshold: it answers as it always did
    assert predictor.policy == Policy()


def test_servers_of_one_host_unpack_their_archives_apart(tmp_path: Path) -> None:
    """Two servers, each with its own model.tar.gz, share the scratch folder of the host."""
    found = []
    for server in ("a", "b"):
        (tmp_path / server).mkdir()
        with tarfile.open(tmp_path / server / "model.tar.gz", "w:gz") as tar:
            for name, text in ((META_FILE, "{}"), ("classes.json", json.dumps([server]))):
                (tmp_path / server / name).write_text(text)
                tar.add(tmp_path / server / name, arcname=name)
        found.append(find_model_dir(tmp_path / server / "model.tar.gz", tmp_path / "scratch"))
    assert [json.loads((d / "classes.json").read_text()) for d in found] == [["a"], ["b"]]
    # the same archive again: its folder, unpacked once, is reused
    assert find_model_dir(tmp_path / "a" / "model.tar.gz", tmp_path / "scratch") == found[0]


def test_model_version_is_a_content_hash(tmp_path: Path) -> None:
    first = _save(tmp_path / "a")["model_version"]
    assert _save(tmp_path / "b")["model_version"] == first
    assert _save(tmp_path / "c", "resnet34")["model_version"] != first


def test_weights_are_a_plain_state_dict(tmp_path: Path) -> None:
    _save(tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())


def test_missing_file_says_what_is_there(tmp_path: Path) -> None:
    _save(tmp_path)
    (tmp_path / "classes.json").unlink()
    with pytest.raises(ArtifactError, match=r"no classes.json; it holds \['model.pt', 'model_meta"):
        load_artifact(tmp_path)


def test_inconsistent_meta(tmp_path: Path) -> None:
    _save(tmp_path)
    (tmp_path / "classes.json").write_text(json.dumps(["a", "b"]))
    with pytest.raises(ArtifactError, match=r"2 classes in classes.json but num_classes=3"):
        load_artifact(tmp_path)


def test_corrupt_weights(tmp_path: Path) -> None:
    _save(tmp_path)
    (tmp_path / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"model\.pt does not load"):
        load_artifact(tmp_path)


def test_backbone_weights_skip_the_head_and_refuse_other_architectures() -> None:
    imagenet_like = build("resnet18", 1000).state_dict()
    model = build("resnet18", 5)
    load_backbone_weights(model, imagenet_like)
    torch.testing.assert_close(model.conv1.weight, imagenet_like["conv1.weight"])
    assert model.fc.out_features == 5
    with pytest.raises(ArtifactError, match="right architecture"):
        load_backbone_weights(build("resnet50", 5), imagenet_like)


def test_backbone_features_through_the_head_are_the_model() -> None:
    model = build("resnet18", 4).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.fc(backbone(model)(images)), model(images))
    assert backbone(model)[0] is model.conv1  # shared, not copied
