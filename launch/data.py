"""`launch upload-data`: the dataset (a folder, or its zip) to S3 as the training job's channels.

The layout is the ImageFolder one `train` reads: `train/ valid/ test/` of class folders, found at
the top of the source or one folder down (dogImages.zip holds `dogImages/train/...`). A zip is read
member by member, never extracted to disk. Objects already in S3 with the same size are skipped, so
an interrupted upload resumes where it stopped; boto3's transfer manager does the concurrency and
the multipart uploads, tqdm the progress bar.
"""

from __future__ import annotations

import argparse
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import IO, Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from s3transfer.subscribers import BaseSubscriber  # type: ignore[import-untyped]
from tqdm import tqdm  # type: ignore[import-untyped]

from container.sagemaker_env import DATA_CHANNELS, UNKNOWN_CHANNEL
from launch.aws import Aws
from launch.errors import LaunchError
from launch.settings import Common

__all__ = ["HELP", "add_arguments", "run"]

HELP = "upload the dataset (folder or zip) to S3 as the train/valid/test channels"


@dataclass(frozen=True)
class _File:
    """One image to upload: its key below the data prefix, its size, and how to open it."""

    relative: str  # e.g. train/001.Affenpinscher/x.jpg
    size: int
    body: Callable[[], str | IO[bytes]]  # a path (opened by s3transfer when due) or a zip member


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        type=Path,
        help="the dataset: a folder with train/ valid/ test/ of class folders, or its zip "
        "(e.g. dogImages.zip; a single top folder inside is fine)",
    )
    parser.add_argument(
        "--workers", type=int, default=16, help="concurrent uploads (default: %(default)s)"
    )


def _relative(parts: tuple[str, ...]) -> str | None:
    """`train/<class>/<file>` when the path is a file of a channel (`unknown/...<file>`: any
    folders), else None."""
    if any(p.startswith(".") for p in parts):
        return None
    if parts[0] == UNKNOWN_CHANNEL and len(parts) >= 2:
        return "/".join(parts)
    if len(parts) != 3 or parts[0] not in DATA_CHANNELS:
        return None
    return "/".join(parts)


def _root_parts(paths: list[tuple[str, ...]]) -> tuple[str, ...]:
    """The folder holding train/: the top, or the one folder below it (dogImages/)."""
    for depth in (0, 1):
        roots = {p[:depth] for p in paths if len(p) > depth + 1 and p[depth] == "train"}
        roots = {r for r in roots if not r or r[0] != "__MACOSX"}
        if len(roots) == 1:
            return roots.pop()
    raise LaunchError(
        "no train/ folder: the dataset must hold train/ valid/ test/ of class folders"
    )


def _folder_files(folder: Path) -> list[_File]:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    root = _root_parts([p.relative_to(folder).parts for p in paths])
    files = []
    for path in paths:
        parts = path.relative_to(folder).parts
        relative = _relative(parts[len(root) :]) if parts[: len(root)] == root else None
        if relative is not None:
            files.append(_File(relative, path.stat().st_size, partial(str, path)))
    return files


def _zip_files(archive: zipfile.ZipFile) -> list[_File]:
    members = [m for m in archive.infolist() if not m.is_dir()]
    root = _root_parts([PurePosixPath(m.filename).parts for m in members])
    files = []
    for member in members:
        parts = PurePosixPath(member.filename).parts
        relative = _relative(parts[len(root) :]) if parts[: len(root)] == root else None
        if relative is not None:
            files.append(_File(relative, member.file_size, partial(archive.open, member)))
    return files


def _existing(aws: Aws, bucket: str, prefix: str) -> dict[str, int]:
    """Every object below the prefix and its size: one listing, not a HEAD per file."""
    pages = (
        aws.boto.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix)
    )
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


class _Progress(BaseSubscriber):  # type: ignore[misc]
    """Advances the bar by the bytes s3transfer reports, from its worker threads."""

    def __init__(self, bar: tqdm[Any]) -> None:
        self._bar = bar

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        self._bar.update(bytes_transferred)


def _upload(aws: Aws, bucket: str, uploads: list[tuple[str, _File]], workers: int) -> None:
    client = aws.boto.client("s3", config=Config(max_pool_connections=workers))
    config = TransferConfig(max_concurrency=workers)
    total = sum(f.size for _, f in uploads)
    with (
        tqdm(total=total, unit="B", unit_scale=True, desc="upload", disable=None) as bar,
        create_transfer_manager(client, config) as manager,
    ):
        progress = _Progress(bar)
        # Submitting blocks once s3transfer's queue is full, so memory stays bounded.
        futures = [
            manager.upload(file.body(), bucket, key, subscribers=[progress])
            for key, file in uploads
        ]
        for future in futures:
            future.result()


def _files(source: Path, stack: ExitStack) -> Iterator[_File]:
    if source.is_dir():
        yield from _folder_files(source)
    elif source.is_file() and zipfile.is_zipfile(source):
        yield from _zip_files(stack.enter_context(zipfile.ZipFile(source)))
    else:
        raise LaunchError(f"{source} is neither a dataset folder nor a zip file")


def run(args: argparse.Namespace, common: Common) -> int:
    data_prefix = f"{common.prefix}/data/"
    with ExitStack() as stack:
        files = list(_files(args.source, stack))  # a bad dataset stops here, before any AWS call
        aws = Aws.connect(common)
        bucket = aws.bucket
        existing = _existing(aws, bucket, data_prefix)
        todo = [
            (data_prefix + f.relative, f)
            for f in files
            if existing.get(data_prefix + f.relative) != f.size
        ]
        if todo:
            _upload(aws, bucket, todo, args.workers)
    skipped = len(files) - len(todo)
    where = f"s3://{bucket}/{data_prefix}"
    if todo:
        size = sum(f.size for _, f in todo) / 1e6
        print(f"uploaded {len(todo)} files ({size:.1f} MB), skipped {skipped} already in {where}")
    else:
        print(f"nothing to upload: all {skipped} files are already in {where} (same sizes)")
    order = (*DATA_CHANNELS, UNKNOWN_CHANNEL)
    channels = sorted({f.relative.split("/")[0] for f in files}, key=order.index)
    for channel in channels:
        print(f"{channel} {aws.s3_uri('data', channel)}/")
    if UNKNOWN_CHANNEL in channels:
        print(
            f"launch train uses it with --{UNKNOWN_CHANNEL} {aws.s3_uri('data', UNKNOWN_CHANNEL)}/"
        )
    return 0
