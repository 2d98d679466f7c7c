"""Channels to datasets: ImageFolder trees (or archives of them), checked before training starts.

Each channel is a folder of class folders (`001.Affenpinscher/*.jpg`). A channel holding one .zip or
.tar(.gz) is unpacked to scratch space first, and a tree that wraps the splits (`dogImages/train`,
`dogImages/valid`, ...) is entered at the channel's own split, so the dataset archive can be
uploaded as is. Class indices come from the training channel; every image is probe-decoded once
so unreadable files are skipped and reported up front, not discovered mid-epoch.

The optional `unknown` channel holds images of none of the classes, in any folders. It is held out
to set and measure abstention; with `train_unknown=true` two thirds of it (every image but each
third, by sorted path) train one more output, "none of these", whose index is the class count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import Dataset

from container.archives import ArchiveError, is_archive, unpack_once
from container.class_names import class_name
from container.decoding import DecodeLimits, ImageDecodeError, Preprocessing, decode, eval_crop
from container.images import random_resized_crop, to_uint8_hwc
from container.sagemaker_env import (
    DATA_CHANNELS,
    OPTIONAL_CHANNELS,
    PRETRAINED_CHANNEL,
    REQUIRED_CHANNELS,
    UNKNOWN_CHANNEL,
    Channel,
)
from container.training.errors import DataError

__all__ = [
    "BadImage",
    "DatasetSplits",
    "FoundImages",
    "ImageFolderDataset",
    "ImageSet",
    "balanced",
    "build_splits",
    "find_images",
    "probe_images",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Probe decodes run JPEGs at 1/8 DCT scale: cheap, yet they read every byte, so truncation shows.
_PROBE_SIDE = 32
# The server's defaults: an image too large for the endpoint to accept is not trained on either.
_LIMITS = DecodeLimits()
_MAX_WRAPPER_DEPTH = 3


@dataclass(frozen=True)
class BadImage:
    """An image file that could not be decoded, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageSet:
    """The usable images of one channel, as (path, class index) pairs, and what was skipped."""

    channel: str
    root: Path
    samples: tuple[tuple[str, int], ...]
    bad: tuple[BadImage, ...]


@dataclass(frozen=True)
class DatasetSplits:
    """Train, valid and optional test sets sharing one class index; the held-out unknown images
    (labelled with the index after the classes), and whether the network has that output."""

    class_folders: tuple[str, ...]
    train: ImageSet
    valid: ImageSet
    test: ImageSet | None
    unknown: ImageSet | None = None
    unknown_output: bool = False

    @property
    def outputs(self) -> int:
        """The network's outputs: one per class, and "none of these" with `unknown_output`."""
        return len(self.class_folders) + self.unknown_output

    @property
    def classes(self) -> list[str]:
        return [class_name(folder) for folder in self.class_folders]

    @property
    def sets(self) -> list[ImageSet]:
        """Train, valid and test (when given)."""
        return [s for s in (self.train, self.valid, self.test) if s is not None]

    @property
    def channels(self) -> list[ImageSet]:
        """Every channel's images: the sets and the held-out unknown images."""
        return self.sets + ([self.unknown] if self.unknown is not None else [])


class ImageFolderDataset(Dataset[tuple[torch.Tensor, int]]):
    """Decoded, cropped uint8 HWC images; `augment` picks random crops and flips.

    A sample's augmentation depends only on (seed, epoch, index): not on which worker loads it,
    how many workers there are, or where in the epoch a resumed run starts.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        prep: Preprocessing,
        augment: bool,
        seed: int = 0,
        epoch: int = 0,
    ) -> None:
        self.samples = samples
        self.prep = prep
        self.augment = augment
        self.seed = seed
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = decode(Path(path), min_side=self.prep.resize_size, limits=_LIMITS)
        except ImageDecodeError as exc:
            raise DataError(f"{path} became unreadable during training: {_reason(exc)}") from exc
        if not self.augment:
            return to_uint8_hwc(eval_crop(image, self.prep)), label
        generator = torch.Generator().manual_seed(
            (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index
        )
        pixels = to_uint8_hwc(random_resized_crop(image, self.prep.image_size, generator))
        if torch.rand((), generator=generator) < 0.5:
            pixels = pixels.flip(1)
        return pixels, label


# --- channel folders ---------------------------------------------------------------------------


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def _channel_root(channel: Channel, scratch: Path) -> Path:
    """The ImageFolder root of a channel: unpack an archive, step through wrapper folders."""
    if not channel.path.is_dir():
        raise DataError(
            f"channel {channel.name!r} has no folder at {channel.path}: "
            "check the channel's S3 prefix and the role's access to it"
        )
    entries = _visible(channel.path)
    root = channel.path
    if len(entries) == 1 and is_archive(entries[0]):
        try:
            root = unpack_once(entries[0], scratch / channel.name)
        except ArchiveError as exc:
            raise DataError(str(exc)) from exc  # it says what to do
    for _ in range(_MAX_WRAPPER_DEPTH):
        entries = _visible(root)
        dirs = [p for p in entries if p.is_dir()]
        named = [d for d in dirs if d.name.lower() == channel.name]
        if named and len(dirs) > 1:
            root = named[0]  # the whole dataset (train/ valid/ test/) in one tree
        elif len(dirs) == 1 and not any(map(_is_image, entries)) and _has_subdirs(dirs[0]):
            root = dirs[0]  # a wrapper such as dogImages/
        else:
            break
    return root


def _has_subdirs(folder: Path) -> bool:
    return any(p.is_dir() for p in _visible(folder))


def _images_under(folder: Path) -> list[Path]:
    """The image files under `folder`, at any depth, sorted. Links to folders below it are not
    followed: a link to `.` or to a parent would make the walk endless; `folder` may be a link."""
    return sorted(
        Path(dirpath) / name
        for dirpath, _, names in os.walk(folder, followlinks=False)
        for name in names
        if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES
    )


def _class_images(root: Path) -> dict[str, list[Path]]:
    """Class folder -> its image files (searched recursively, like torchvision's ImageFolder)."""
    found: dict[str, list[Path]] = {}
    for folder in (p for p in _visible(root) if p.is_dir()):
        images = _images_under(folder)
        if images:
            found[folder.name] = images
        else:
            logger.warning("Class folder %s holds no images; ignored", folder)
    return found


# --- finding, probing, indexing ----------------------------------------------------------------


@dataclass(frozen=True)
class FoundImages:
    """What the channels hold, before any image is decoded: class folder -> files, per channel."""

    class_folders: tuple[str, ...]
    roots: dict[str, Path]
    files: dict[str, dict[str, list[Path]]]
    unknown: list[Path]


def find_images(channels: dict[str, Channel], scratch: Path) -> FoundImages:
    """Locate the train, valid and (optional) test trees and check their class layout."""
    for name in REQUIRED_CHANNELS:
        if name not in channels:
            raise DataError(
                f"required channel {name!r} is missing: the job has channels {sorted(channels)}; "
                f"give it {list(REQUIRED_CHANNELS)} (and optionally {list(OPTIONAL_CHANNELS)}), "
                "each an ImageFolder tree"
            )
    known = {*DATA_CHANNELS, PRETRAINED_CHANNEL, UNKNOWN_CHANNEL}
    if unused := sorted(set(channels) - known):
        logger.warning("Ignoring channels %s", unused)
    used = [channels[name] for name in (*DATA_CHANNELS, UNKNOWN_CHANNEL) if name in channels]
    for channel in used:
        if channel.input_mode == "Pipe":
            raise DataError(
                f"channel {channel.name!r} uses Pipe mode, which cannot serve random access to "
                "image files; use File or FastFile input mode"
            )
        if channel.s3_distribution_type != "FullyReplicated":
            raise DataError(
                f"channel {channel.name!r} uses {channel.s3_distribution_type}; use "
                "FullyReplicated: distributed training shards the data itself"
            )
    roots = {channel.name: _channel_root(channel, scratch) for channel in used}
    unknown_images = _unknown_images(roots[UNKNOWN_CHANNEL]) if UNKNOWN_CHANNEL in roots else []
    files = {name: _class_images(root) for name, root in roots.items() if name != UNKNOWN_CHANNEL}
    for name, by_class in files.items():
        if not by_class:
            raise DataError(
                f"channel {name!r} has no images in class folders under {roots[name]}: expected "
                f"{name}/<class>/<image>.jpg; usually the channel's S3 prefix is wrong or the "
                "role lacks access"
            )
    folders = tuple(sorted(files["train"]))
    if len(folders) < 2:
        raise DataError(
            f"channel 'train' has {len(folders)} class folder ({', '.join(folders)}) under "
            f"{roots['train']}: a classifier needs at least two classes"
        )
    _check_names(folders)
    for name, by_class in files.items():
        if unknown := sorted(set(by_class) - set(folders)):
            raise DataError(
                f"channel {name!r} has class folders that 'train' lacks: "
                f"{', '.join(unknown[:5])}; every class must have training images"
            )
    return FoundImages(class_folders=folders, roots=roots, files=files, unknown=unknown_images)


def _unknown_images(root: Path) -> list[Path]:
    images = _images_under(root)
    if not images:
        raise DataError(
            f"channel {UNKNOWN_CHANNEL!r} has no images under {root}: give it images of things "
            "that are none of the classes, or leave the channel out"
        )
    return images


def _probe(path: Path) -> BadImage | None:
    try:
        decode(path, min_side=_PROBE_SIDE, limits=_LIMITS)
    except ImageDecodeError as exc:  # over the pixel limit included: ImageTooLargeError
        return BadImage(str(path), _reason(exc))
    return None


def _reason(exc: ImageDecodeError) -> str:
    """The message, and what the decoder said (the job's own log and report, not a client's)."""
    return f"{exc} ({exc.detail})" if exc.detail else str(exc)


def probe_images(found: FoundImages, threads: int) -> dict[str, list[BadImage]]:
    """Decode every image once, cheaply, and return the unreadable ones per channel."""
    files = {name: _all_files(by_class) for name, by_class in found.files.items()}
    if found.unknown:
        files[UNKNOWN_CHANNEL] = found.unknown
    # Pillow releases the GIL while decoding, so threads use every core.
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return {
            name: [bad for bad in pool.map(_probe, paths, chunksize=16) if bad is not None]
            for name, paths in files.items()
        }


def _all_files(by_class: dict[str, list[Path]]) -> list[Path]:
    return [path for paths in by_class.values() for path in paths]


def _readable(
    name: str, labelled: list[tuple[Path, int]], bad: dict[str, list[BadImage]], max_bad: float
) -> tuple[tuple[tuple[str, int], ...], tuple[BadImage, ...]]:
    skipped = bad.get(name, [])
    if len(skipped) > max_bad * len(labelled):
        listed = ", ".join(b.path for b in skipped[:5])
        raise DataError(
            f"channel {name!r}: {len(skipped)} of {len(labelled)} images are unreadable, more "
            f"than max_bad_images={max_bad:g} allows; fix or remove them: {listed}"
        )
    skip = {b.path for b in skipped}
    samples = tuple((str(path), label) for path, label in labelled if str(path) not in skip)
    return samples, tuple(skipped)


def build_splits(
    found: FoundImages, bad: dict[str, list[BadImage]], max_bad: float, train_unknown: bool
) -> DatasetSplits:
    """Index the readable images; fail when a channel has more unreadable ones than allowed.
    `train_unknown` moves two thirds of the unknown images into train, as one more class."""
    index = {folder: i for i, folder in enumerate(found.class_folders)}
    sets: dict[str, ImageSet] = {}
    for name, by_class in found.files.items():
        labelled = [(path, index[folder]) for folder, paths in by_class.items() for path in paths]
        samples, skipped = _readable(name, labelled, bad, max_bad)
        sets[name] = ImageSet(name, found.roots[name], samples, skipped)
    if not found.unknown:
        if train_unknown:
            raise DataError(
                f"train_unknown=true needs an {UNKNOWN_CHANNEL!r} channel of images that are "
                "none of the classes; add one or set train_unknown=false"
            )
        return DatasetSplits(found.class_folders, sets["train"], sets["valid"], sets.get("test"))
    none_of_these = len(found.class_folders)
    samples, skipped = _readable(
        UNKNOWN_CHANNEL, [(p, none_of_these) for p in found.unknown], bad, max_bad
    )
    held_out, train = samples, sets["train"]
    if train_unknown:
        held_out = samples[::3]
        trained_on = [s for i, s in enumerate(samples) if i % 3]
        train = replace(train, samples=train.samples + tuple(trained_on))
    unknown = ImageSet(UNKNOWN_CHANNEL, found.roots[UNKNOWN_CHANNEL], held_out, skipped)
    return DatasetSplits(
        found.class_folders, train, sets["valid"], sets.get("test"), unknown, train_unknown
    )


def balanced(samples: Sequence[tuple[str, int]], classes: int, limit: int) -> list[tuple[str, int]]:
    """At most `limit` of `samples` (of labels below `classes`), the same number from each class
    where they have it, in their order."""
    per_class = -(-limit // classes)
    taken: dict[int, int] = {}
    kept = []
    for path, label in samples:
        if label < classes and taken.get(label, 0) < per_class:
            taken[label] = taken.get(label, 0) + 1
            kept.append((path, label))
    return kept


def _check_names(folders: Iterable[str]) -> None:
    seen: dict[str, str] = {}
    for folder in folders:
        name = class_name(folder)
        if name in seen:
            raise DataError(
                f"class folders {seen[name]!r} and {folder!r} both read as {name!r}; rename one"
            )
        seen[name] = folder
