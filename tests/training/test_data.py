"""Channels to datasets: layouts, archives, class indices, unreadable images."""

from __future__ import annotations

import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from container.decoding import Preprocessing
from container.sagemaker_env import Channel
from container.training.data import (
    DatasetSplits,
    ImageFolderDataset,
    build_splits,
    find_images,
    probe_images,
)
from container.training.errors import DataError
from tests.crafted import png_header


def _channels(data: Path, *names: str, **overrides: Channel) -> dict[str, Channel]:
    channels = {name: Channel(name=name, path=data / name) for name in names}
    return {**channels, **overrides}


@pytest.fixture
def data(dataset: Path, tmp_path: Path) -> Path:
    """A private copy of the sample dataset, to break."""
    return Path(shutil.copytree(dataset, tmp_path / "data"))


def _load(
    channels: dict[str, Channel],
    scratch: Path,
    max_bad: float = 0.05,
    train_unknown: bool = False,
) -> DatasetSplits:
    found = find_images(channels, scratch)
    return build_splits(found, probe_images(found, threads=2), max_bad, train_unknown)


def test_sample_dataset_loads_with_readable_names(dataset: Path, tmp_path: Path) -> None:
    splits = _load(_channels(dataset, "train", "valid", "test"), tmp_path)
    assert splits.class_folders == (
        "001.Affenpinscher",
        "002.Afghan_hound",
        "003.Airedale_terrier",
        "004.Akita",
    )
    assert splits.classes == ["Affenpinscher", "Afghan hound", "Airedale terrier", "Akita"]
    assert [len(s.samples) for s in splits.sets] == [64, 24, 24]
    assert [label for _, label in splits.train.samples] == [0] * 16 + [1] * 16 + [2] * 16 + [3] * 16
    (bad,) = splits.train.bad  # the generator's truncated JPEG
    assert bad.path.endswith("broken_000.jpg")
    assert "truncated" in bad.reason
    assert splits.test is not None


def test_test_channel_is_optional(dataset: Path, tmp_path: Path) -> None:
    splits = _load(_channels(dataset, "train", "valid"), tmp_path)
    assert splits.test is None
    assert [s.channel for s in splits.sets] == ["train", "valid"]


def test_class_indices_come_from_train(data: Path, tmp_path: Path) -> None:
    shutil.rmtree(data / "valid" / "001.Affenpinscher")  # valid lacks the first class
    splits = _load(_channels(data, "train", "valid"), tmp_path / "scratch")
    labels = {label for _, label in splits.valid.samples}
    assert labels == {1, 2, 3}
    for path, label in splits.valid.samples:
        assert Path(path).parent.name == splits.class_folders[label]


def test_class_missing_from_train_is_an_error(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "valid" / "004.Akita", data / "valid" / "099.Stray_dog")
    with pytest.raises(DataError, match=r"'valid' has class folders that 'train' lacks: 099"):
        find_images(_channels(data, "train", "valid"), tmp_path / "scratch")


def _archive(source: Path, target: Path) -> Path:
    if target.name.endswith(".zip"):
        with zipfile.ZipFile(target, "w") as zf:
            for path in sorted(source.rglob("*")):
                zf.write(path, path.relative_to(source.parent))
    else:
        with tarfile.open(target, "w:gz") as tf:
            tf.add(source, arcname=source.name)
    return target


@pytest.mark.parametrize("name", ["dogImages.zip", "dogImages.tar.gz"])
def test_whole_dataset_archive_in_every_channel(dataset: Path, tmp_path: Path, name: str) -> None:
    """The dataset archive as users download it: dogImages/{train,valid,test}/..."""
    wrapped = tmp_path / "src" / "dogImages"
    shutil.copytree(dataset, wrapped)
    archive = _archive(wrapped, tmp_path / name)
    data = tmp_path / "data"
    for channel in ("train", "valid"):
        (data / channel).mkdir(parents=True)
        shutil.copy(archive, data / channel / name)
    splits = _load(_channels(data, "train", "valid"), tmp_path / "scratch")
    assert [len(s.samples) for s in splits.sets] == [64, 24]
    assert splits.train.root == tmp_path / "scratch" / "train" / "dogImages" / "train"


def test_per_channel_archive_and_wrapper_folder(dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset / "valid", data / "valid" / "images" / "valid-set")  # a wrapper
    (data / "train").mkdir(parents=True)
    _archive(dataset / "train", data / "train" / "train.zip")
    splits = _load(_channels(data, "train", "valid"), tmp_path / "scratch")
    assert [len(s.samples) for s in splits.sets] == [64, 24]


def test_archive_is_unpacked_once(dataset: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    _archive(dataset / "train", data / "train" / "train.tar.gz")
    shutil.copytree(dataset / "valid", data / "valid")
    channels = _channels(data, "train", "valid")
    find_images(channels, tmp_path / "scratch")
    marker = tmp_path / "scratch" / "train" / "train" / "001.Affenpinscher" / "marker.jpg"
    marker.write_bytes(b"left by the first unpack")
    find_images(channels, tmp_path / "scratch")
    assert marker.exists()


def test_corrupt_archive(tmp_path: Path, dataset: Path) -> None:
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "train" / "train.zip").write_bytes(b"PK\x03\x04 not really a zip")
    shutil.copytree(dataset / "valid", data / "valid")
    with pytest.raises(DataError, match=r"cannot unpack .*train.zip"):
        find_images(_channels(data, "train", "valid"), tmp_path / "scratch")


def test_too_many_unreadable_images_fail_and_name_files(data: Path, tmp_path: Path) -> None:
    for n in range(5):
        (data / "train" / "004.Akita" / f"zero_{n}.jpg").write_bytes(b"")
    with pytest.raises(DataError) as info:
        _load(_channels(data, "train", "valid"), tmp_path / "scratch", max_bad=0.05)
    message = str(info.value)
    assert "6 of 70 images are unreadable" in message
    assert "max_bad_images=0.05" in message
    assert "zero_0.jpg" in message
    assert len(_load(_channels(data, "train", "valid"), tmp_path / "s2", 0.1).train.bad) == 6


def test_manifest_files_and_unknown_channels_are_ignored(data: Path, tmp_path: Path) -> None:
    (data / "train-manifest").write_text("s3://bucket/prefix/")
    channels = _channels(data, "train", "valid", "extras")
    assert len(_load(channels, tmp_path / "scratch").train.samples) == 64


def _unknown_channel(data: Path) -> None:
    """Images of none of the classes, in nested folders of any names; one unreadable."""
    for n, source in enumerate(sorted((data / "test" / "004.Akita").glob("*.jpg"))):
        target = data / "unknown" / ("cats" if n % 2 else "sofas/big") / f"{n}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    (data / "unknown" / "cats" / "broken.jpg").write_bytes(b"")


def test_the_unknown_channel_is_held_out_or_one_more_class(data: Path, tmp_path: Path) -> None:
    _unknown_channel(data)
    channels = _channels(data, "train", "valid", "unknown")
    held = _load(channels, tmp_path / "a", max_bad=0.5)
    assert held.unknown is not None
    assert len(held.unknown.samples) == 5
    assert {label for _, label in held.unknown.samples} == {4}  # after the 4 classes
    assert [b.path.endswith("broken.jpg") for b in held.unknown.bad] == [True]
    assert (held.outputs, held.unknown_output, len(held.train.samples)) == (4, False, 64)
    assert held.unknown not in held.sets
    assert held.channels[-1] is held.unknown

    trained = _load(channels, tmp_path / "b", max_bad=0.5, train_unknown=True)
    assert trained.unknown is not None
    assert trained.unknown.samples == held.unknown.samples[::3]
    assert (trained.outputs, trained.unknown_output) == (5, True)
    added = trained.train.samples[64:]
    assert sorted(added + trained.unknown.samples) == sorted(held.unknown.samples)
    assert {label for _, label in added} == {4}


def test_train_unknown_without_the_channel_is_an_error(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_unknown=true needs an 'unknown' channel"):
        _load(_channels(dataset, "train", "valid"), tmp_path, train_unknown=True)


def test_an_empty_unknown_channel_is_an_error(data: Path, tmp_path: Path) -> None:
    (data / "unknown" / "nothing").mkdir(parents=True)
    with pytest.raises(DataError, match="channel 'unknown' has no images under"):
        _load(_channels(data, "train", "valid", "unknown"), tmp_path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda d: shutil.rmtree(d / "valid"),
            r"channel 'valid' has no folder at .*valid: .*S3 prefix",
        ),
        (
            lambda d: [shutil.rmtree(p) for p in (d / "valid").iterdir()],
            r"channel 'valid' has no images in class folders.*S3 prefix is wrong",
        ),
        (
            lambda d: [shutil.rmtree(p) for p in sorted((d / "train").iterdir())[1:]],
            r"'train' has 1 class folder \(001.Affenpinscher\).*at least two classes",
        ),
    ],
)
def test_unusable_channels(data: Path, tmp_path: Path, mutate: object, message: str) -> None:
    mutate(data)  # type: ignore[operator]
    with pytest.raises(DataError, match=message):
        find_images(_channels(data, "train", "valid"), tmp_path / "scratch")


def test_required_channel_missing(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"required channel 'valid' is missing.*\['train'\]"):
        find_images(_channels(dataset, "train"), tmp_path)


def test_pipe_mode_is_refused(dataset: Path, tmp_path: Path) -> None:
    pipe = Channel(name="train", path=dataset / "train", input_mode="Pipe")
    with pytest.raises(DataError, match=r"Pipe mode.*use File or FastFile"):
        find_images(_channels(dataset, "valid", train=pipe), tmp_path)


def test_duplicate_display_names_are_refused(data: Path, tmp_path: Path) -> None:
    shutil.copytree(data / "train" / "004.Akita", data / "train" / "005.Akita")
    with pytest.raises(DataError, match=r"'004.Akita' and '005.Akita' both read as 'Akita'"):
        find_images(_channels(data, "train", "valid"), tmp_path / "scratch")


def test_dataset_items_are_uint8_hwc(dataset: Path, tmp_path: Path) -> None:
    splits = _load(_channels(dataset, "train", "valid"), tmp_path)
    prep = Preprocessing.for_image_size(48)
    for augment in (False, True):
        pixels, label = ImageFolderDataset(splits.valid.samples, prep, augment)[0]
        assert pixels.shape == (48, 48, 3)
        assert str(pixels.dtype) == "torch.uint8"
        assert label == 0


def test_links_to_folders_inside_a_class_folder_are_not_followed(
    data: Path, tmp_path: Path
) -> None:
    """A link to `.` or to a parent would make the walk endless, or list images twice."""
    akita = data / "train" / "004.Akita"
    (akita / "self").symlink_to(".", target_is_directory=True)
    (akita / "parent").symlink_to("..", target_is_directory=True)
    found = find_images(_channels(data, "train", "valid"), tmp_path / "scratch")
    files = found.files["train"]["004.Akita"]
    assert len(files) == len(set(files)) == 16
    assert all(path.parent == akita for path in files)


def test_an_image_over_the_pixel_limit_is_reported_as_unreadable(
    data: Path, tmp_path: Path
) -> None:
    """Training decodes with the server's pixel cap: what the endpoint would refuse is skipped."""
    huge = data / "train" / "004.Akita" / "huge.png"
    huge.write_bytes(png_header(8000, 6000))  # 48 MP; no image data is needed to refuse it
    splits = _load(_channels(data, "train", "valid"), tmp_path / "scratch")
    bad = {Path(b.path).name: b.reason for b in splits.train.bad}
    assert bad["huge.png"].startswith("the image is 8000x6000 pixels (48 MP); the limit is 40 MP")
    assert str(huge) not in {path for path, _ in splits.train.samples}
