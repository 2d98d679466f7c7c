"""`launch upload-data` against moto's S3: the layout, resuming by size, the zip, the errors."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.launch.conftest import Launch, one_line_error

BUCKET = "dog-data"
PREFIX = "dog-classifier/data/"


def _expected(dataset: Path) -> dict[str, int]:
    files = [p for p in dataset.rglob("*") if p.is_file()]
    return {PREFIX + p.relative_to(dataset).as_posix(): p.stat().st_size for p in files}


def _objects(s3: Any) -> dict[str, int]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_uploads_the_channels_then_only_what_is_missing(launch: Launch, dataset: Path) -> None:
    expected = _expected(dataset)
    first = launch.ok("upload-data", str(dataset), "--bucket", BUCKET)
    s3 = launch.client("s3")
    assert _objects(s3) == expected
    assert f"uploaded {len(expected)} files" in first.stdout
    for channel in ("train", "valid", "test"):
        assert f"{channel} s3://{BUCKET}/{PREFIX}{channel}/\n" in first.stdout

    again = launch.ok("upload-data", str(dataset), "--bucket", BUCKET)
    assert f"nothing to upload: all {len(expected)} files are already in" in again.stdout

    gone = sorted(expected)[:3]
    for key in gone:
        s3.delete_object(Bucket=BUCKET, Key=key)
    changed = sorted(expected)[-1]  # same key, other size: uploaded again too
    s3.put_object(Bucket=BUCKET, Key=changed, Body=b"truncated")
    resumed = launch.ok("upload-data", str(dataset), "--bucket", BUCKET)
    assert "uploaded 4 files" in resumed.stdout
    assert f"skipped {len(expected) - 4} already in s3://{BUCKET}/{PREFIX}" in resumed.stdout
    assert _objects(s3) == expected


@pytest.mark.parametrize("top", ["dogImages/", ""], ids=["top-folder", "flat"])
def test_a_zip_uploads_like_the_folder(
    launch: Launch, dataset: Path, tmp_path: Path, top: str
) -> None:
    archive = tmp_path / "dogImages.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("__MACOSX/._train", b"resource fork")  # what macOS's zip adds
        for path in sorted(dataset.rglob("*")):
            zipped.write(path, top + path.relative_to(dataset).as_posix())
    done = launch.ok("upload-data", str(archive), "--bucket", BUCKET)
    assert _objects(launch.client("s3")) == _expected(dataset)
    assert "train s3://" in done.stdout


def test_an_unknown_folder_is_uploaded_as_its_channel(
    launch: Launch, dataset: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(dataset / "train", data / "train")
    nested = data / "unknown" / "cats" / "indoor"
    nested.mkdir(parents=True)
    (nested / "cat.jpg").write_bytes(b"jpeg")
    (data / "unknown" / "sofa.png").write_bytes(b"png")
    done = launch.ok("upload-data", str(data), "--bucket", BUCKET)
    objects = _objects(launch.client("s3"))
    assert f"{PREFIX}unknown/cats/indoor/cat.jpg" in objects
    assert f"{PREFIX}unknown/sofa.png" in objects
    assert f"unknown s3://{BUCKET}/{PREFIX}unknown/\n" in done.stdout
    assert f"launch train uses it with --unknown s3://{BUCKET}/{PREFIX}unknown/" in done.stdout


def test_a_folder_without_train_is_one_line(launch: Launch, tmp_path: Path) -> None:
    (tmp_path / "data" / "valid" / "001.Affenpinscher").mkdir(parents=True)
    (tmp_path / "data" / "valid" / "001.Affenpinscher" / "a.jpg").write_bytes(b"jpeg")
    done = launch("upload-data", str(tmp_path / "data"), "--bucket", BUCKET)
    assert one_line_error(done).startswith("launch: no train/ folder")
