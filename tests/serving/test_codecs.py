"""Request and response codecs, the custom-attribute parser and the settings reader."""

from __future__ import annotations

import asyncio
import base64
import functools
import gzip
import io
import json
import stat
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image

from container.abstention import Override
from container.serving.budget import RequestBudget
from container.serving.codecs import (
    JSON,
    JSONLINES,
    READABLE_TYPES,
    ImageInput,
    choose_response_type,
    encode,
    parse_custom_attributes,
    read_inputs,
)
from container.serving.errors import (
    BadRequestError,
    NotAcceptableError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from container.serving.settings import ServeSettings, SettingsError
from tests.crafted import Zeros

BUDGET = RequestBudget(max_images=4, max_image_pixels=10_000, max_request_pixels=30_000)
NPY = "application/x-npy"


def _inputs(content_type: str | None, body: bytes) -> tuple[list[ImageInput], bool]:
    return asyncio.run(read_inputs(content_type, body, BUDGET))


def _read(content_type: str | None, body: bytes) -> tuple[list[str], bool]:
    inputs, many = _inputs(content_type, body)
    return [i.name for i in inputs], many


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _npy_header(shape: tuple[int, ...], descr: str = "|u1", fortran_order: bool = False) -> bytes:
    """A header written by numpy itself, with no data after it."""
    buffer = io.BytesIO()
    header = {"descr": descr, "fortran_order": fortran_order, "shape": shape}
    np.lib.format.write_array_header_1_0(buffer, header)
    return buffer.getvalue()


def _raw_npy_header(text: str) -> bytes:
    """A format 2.0 header holding any text: what numpy would hand to `ast.literal_eval`."""
    encoded = text.encode("latin-1")
    return b"\x93NUMPY\x02\x00" + len(encoded).to_bytes(4, "little") + encoded


def _multipart(files: int, boundary: str = "xyz") -> tuple[str, bytes]:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="f"; filename="{i}.jpg"\r\n'
        f"\r\nimage {i}\r\n"
        for i in range(files)
    ]
    return (
        f"multipart/form-data; boundary={boundary}",
        f"{''.join(parts)}--{boundary}--\r\n".encode(),
    )


def test_media_type_parameters_and_case_are_ignored() -> None:
    assert _read("Image/JPEG; charset=binary", b"\xff\xd8") == (["image"], False)


def test_multipart_from_raw_bytes() -> None:
    boundary = "xyz"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\nAAAA\r\n"
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n3\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="other"; filename="b.png"\r\n'
        f"\r\nBBBB\r\n--{boundary}--\r\n"
    ).encode()
    inputs, many = _inputs(f"multipart/form-data; boundary={boundary}", body)
    assert [(i.name, i.data) for i in inputs] == [("a.jpg", b"AAAA"), ("b.png", b"BBBB")]
    assert many


@pytest.mark.parametrize(
    ("content_type", "body", "error"),
    [
        ("multipart/form-data", b"--x\r\n", BadRequestError),  # no boundary
        (
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="f"\r\n\r\nplain\r\n--x--\r\n',
            BadRequestError,
        ),  # no file parts
        ("application/jsonlines", b"\n\n", BadRequestError),
        ("application/jsonlines", b'{"b64": "AAAA"}\nnot json\n', BadRequestError),
        ("application/x-npy", b"\x93NUMPY garbage", BadRequestError),
        ("text/csv", b"1,2,3", UnsupportedMediaTypeError),
    ],
)
def test_malformed_bodies(content_type: str, body: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        _inputs(content_type, body)


def test_jsonlines_names_the_bad_line() -> None:
    body = b'{"b64": "AAAA"}\n{"b64": 7}\n'
    with pytest.raises(BadRequestError, match="line 2: expected a base64 string"):
        _inputs("application/jsonlines", body)


def test_json_single_and_lists() -> None:
    b64 = base64.b64encode(b"img").decode()
    assert _read(JSON, json.dumps(b64).encode()) == (["image"], False)
    assert _read(JSON, json.dumps([b64, b64]).encode()) == (["image 0", "image 1"], True)
    assert _read(JSON, json.dumps({"images": [b64]}).encode()) == (["image 0"], True)


def test_json_objects_may_nest_the_base64_string() -> None:
    b64 = base64.b64encode(b"img").decode()
    inputs, _ = _inputs(JSON, json.dumps({"instances": [{"image": {"b64": b64}}]}).encode())
    assert inputs[0].data == b"img"


def _over_the_count(kind: str) -> tuple[str, bytes]:
    """Five images for a budget of four; the JSON ones are not base64, so decoding them first
    would answer 400."""
    if kind == "json list":
        return JSON, json.dumps(["not base64!"] * 5).encode()
    if kind == "json instances":
        return JSON, json.dumps({"instances": ["not base64!"] * 5}).encode()
    if kind == "json lines":
        return "application/jsonlines", b"not json\n" * 5
    if kind == "multipart":
        return _multipart(5)
    if kind == "zip":
        return ZIP, _zip([(f"{i}.png", b"not an image") for i in range(5)])
    if kind == "tar":
        return TAR, _tar([(f"{i}.png", b"not an image") for i in range(5)])
    return NPY, _npy(np.zeros((5, 4, 4, 3), np.uint8))


@pytest.mark.parametrize(
    "kind", ["json list", "json instances", "json lines", "multipart", "npy", "zip", "tar"]
)
def test_more_images_than_the_budget_are_refused_before_any_is_read(kind: str) -> None:
    content_type, body = _over_the_count(kind)
    with pytest.raises(PayloadTooLargeError, match=r"the limit is 4 .*\(SERVE_MAX_IMAGES\)$"):
        _inputs(content_type, body)


def test_as_many_images_as_the_budget_are_read() -> None:
    b64 = base64.b64encode(b"img").decode()
    assert len(_inputs(JSON, json.dumps([b64] * 4).encode())[0]) == 4
    assert len(_inputs(*_multipart(4))[0]) == 4
    assert len(_inputs(NPY, _npy(np.zeros((4, 4, 4, 3), np.uint8)))[0]) == 4


def test_npy_pixels_over_the_budget() -> None:
    with pytest.raises(PayloadTooLargeError, match=r"101x100 .*\(SERVE_MAX_IMAGE_PIXELS\)$"):
        _inputs(NPY, _npy(np.zeros((100, 101, 3), np.uint8)))
    with pytest.raises(PayloadTooLargeError, match=r"\(SERVE_MAX_REQUEST_PIXELS\)$"):
        _inputs(NPY, _npy(np.zeros((4, 90, 90, 3), np.uint8)))  # 8,100 each, 32,400 in all


@pytest.mark.parametrize(
    "body",
    [
        _npy_header((10**12, 10**12, 3)) + bytes(64),
        _npy_header((2**32, 2**32, 3)),  # 3 * 2**64 bytes: 0 in int64, as the body holds
        _npy_header((1, 2000, 2000, 3), "<f8"),  # 96 MB that numpy.load would allocate
        _npy_header((8, 8, 3)) + bytes(8 * 8 * 3 - 1),
        _npy_header((8, 8, 3)) + bytes(8 * 8 * 3 + 1),
    ],
    ids=["huge", "int64-overflow", "no-data", "one-byte-short", "one-byte-over"],
)
def test_npy_headers_that_lie_about_the_size_allocate_nothing(body: bytes) -> None:
    tracemalloc.start()
    try:
        with pytest.raises(BadRequestError, match=r"the \.npy header says .* but the body holds"):
            _inputs(NPY, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_raw_npy_header("-" * 9990 + "1"), "header is not one this server reads"),  # MemoryError
        (_raw_npy_header("1" + "+1" * 4900), "header is not one this server reads"),  # Recursion
        (_raw_npy_header("{[]: 1}"), "header is not one this server reads"),  # TypeError
        (_raw_npy_header("{'descr': '<f4', (((("), "header is not one"),  # tokenize.TokenError
        (_raw_npy_header("x" * 10_001), "cut short or too long"),
        (_npy_header((8, 8, 3), "|O") + bytes(8 * 8 * 3 * 8), "dtype |O is not numeric"),
        (_npy_header((8, 8, 3), "|b1") + bytes(8 * 8 * 3), "dtype |b1 is not numeric"),
        (_npy_header((8, 8, 3), "<f3") + bytes(8 * 8 * 3 * 3), "dtype <f3 is not one numpy has"),
        (_npy_header((8, 8, 3), "<M8[s]") + bytes(8 * 8 * 3 * 8), "header is not one"),
        (_npy(np.zeros((2, 8, 8, 3), np.dtype([("a", "u1")]))), "header is not one"),
        (_npy(np.zeros(8, np.uint8)), "got 1 dimensions"),
        (_npy(np.zeros((8, 0, 3), np.uint8)), "of shape (8, 0, 3) is empty"),
        (_npy(np.zeros((8, 8, 5), np.uint8)), "1, 3 or 4 channels"),
        (b"\x93NUMPY\x03\x00" + _npy(np.zeros((8, 8), np.uint8))[8:], "format 1.0 or 2.0"),
        (b"\x93NUMPY\x01", "format 1.0 or 2.0"),
        (_npy(np.zeros((8, 8), np.uint8))[:20], "cut short"),
    ],
)
def test_npy_headers_this_server_does_not_read(body: bytes, words: str) -> None:
    with pytest.raises(BadRequestError) as raised:
        _inputs(NPY, body)
    assert words in raised.value.message
    assert " at 0x" not in raised.value.message


RGB = np.arange(8 * 9 * 3, dtype=np.uint8).reshape(8, 9, 3)


@pytest.mark.parametrize(
    ("array", "expected"),
    [
        (RGB, RGB),
        (RGB.transpose(2, 0, 1).copy(), RGB),  # channels first
        (np.asfortranarray(RGB.astype(np.int16)), RGB),
        (np.full((8, 9), 7, np.uint8), np.full((8, 9, 3), 7)),  # gray
        (np.full((8, 9, 4), 7, np.uint8), np.full((8, 9, 3), 7)),  # alpha dropped
        (np.full((8, 9, 3), 0.5, ">f4"), np.full((8, 9, 3), 127)),  # [0, 1] scaled
        (np.full((8, 9, 3), 300.0), np.full((8, 9, 3), 255)),  # clipped
    ],
    ids=["rgb", "channels-first", "fortran-int16", "gray", "rgba", "unit-float", "over-255"],
)
def test_npy_arrays_become_rgb_pixels(array: np.ndarray, expected: np.ndarray) -> None:
    (image,), many = _inputs(NPY, _npy(array))
    assert not many
    assert image.pixels is not None
    assert image.pixels.dtype == np.uint8
    assert image.pixels.tolist() == expected.tolist()


@pytest.mark.parametrize(
    ("values", "expected"),
    [([np.nan, np.inf, -np.inf], [0, 255, 0]), ([0.5, -np.inf, np.nan], [127, 0, 0])],
)
def test_npy_floats_that_are_not_finite_are_clipped_without_a_warning(
    values: list[float], expected: list[int]
) -> None:
    array = np.array([[values]], np.float16)
    (image,), _ = _inputs("application/octet-stream", _npy(array))
    assert image.pixels is not None
    assert image.pixels.tolist() == [[expected]]


@pytest.mark.parametrize(
    ("content_type", "body", "words"),
    [
        (JSON, b"[" * 100_000 + b"]" * 100_000, "nests JSON arrays or objects too deeply"),
        (JSONLINES, b'{"b64": "AAAA"}\n' + b"[" * 100_000, "line 2 nests JSON"),
        (JSON, b"[" + b"7" * 5000 + b"]", "an integer of over 4300 digits"),
        (JSON, b'"\xff"', "invalid start byte at byte 1"),
        (JSON, b'{"b64": ', r"not valid JSON \(Expecting value"),
    ],
)
def test_hostile_json_is_a_bad_request(content_type: str, body: bytes, words: str) -> None:
    with pytest.raises(BadRequestError, match=words):
        _inputs(content_type, body)


# --- .zip and .tar bodies -------------------------------------------------------------------------

ZIP = "application/zip"
TAR = "application/x-tar"
MANY = RequestBudget(max_images=64, max_image_pixels=10_000, max_request_pixels=10**6)
MiB = 1 << 20


@functools.cache
def _png(i: int) -> bytes:
    """A real 8x8 PNG, different for each `i`."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (i % 256, (7 * i) % 256, 255 - i % 256)).save(buffer, "PNG")
    return buffer.getvalue()


def _zip(
    members: list[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar(members: list[tuple[str | tarfile.TarInfo, bytes]], mode: str = "w") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tf:
        for member, data in members:
            info = tarfile.TarInfo(member) if isinstance(member, str) else member
            if info.isfile():
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return buffer.getvalue()


def _tar_entry(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, "/etc/passwd"
    return info


def _archive(
    content_type: str,
    body: bytes,
    budget: RequestBudget = MANY,
    max_unpacked_bytes: int = 6 * MiB,
) -> list[ImageInput]:
    inputs, many = asyncio.run(read_inputs(content_type, body, budget, max_unpacked_bytes))
    assert many
    return inputs


def _central(body: bytes, name: str, offset: int, value: bytes) -> bytes:
    """The zip with `value` written `offset` bytes into the central directory entry of `name`."""
    at = body.index(b"PK\x01\x02")
    while body[at + 46 : at + 46 + len(name)] != name.encode():
        at = body.index(b"PK\x01\x02", at + 1)
    return body[: at + offset] + value + body[at + offset + len(value) :]


def _zip_of_zeros(size: int, *after: tuple[str, bytes]) -> bytes:
    """`zeros.png`, `size` zero bytes honestly declared and deflated about 1000:1, then `after`."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("zeros.png", "w") as out:
            for _ in range(size // MiB):
                out.write(bytes(MiB))
        for name, data in after:
            zf.writestr(name, data)
    return buffer.getvalue()


def _tar_gz_of_zeros(size: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tf:
        info = tarfile.TarInfo("zeros.png")
        info.size = size
        tf.addfile(info, Zeros(size))  # type: ignore[arg-type]
    return buffer.getvalue()


def _fifty(content_type: str) -> bytes:
    members = [(f"photos/{i // 10}/{i:02d}.png", _png(i)) for i in range(50)]
    if content_type in (ZIP, "application/x-zip-compressed"):
        return _zip(members)
    return _tar(members, "w" if content_type == "application/tar" else "w:gz")


@pytest.mark.parametrize(
    "content_type",
    [
        ZIP,
        "application/x-zip-compressed",
        "application/tar",  # a plain tar
        TAR,  # gzip-compressed, found by its magic number
        "application/gzip",
        "application/x-gzip",
        "application/x-gtar",
    ],
)
def test_an_archive_of_many_images_is_read_in_order_and_named_by_path(content_type: str) -> None:
    inputs = _archive(content_type, _fifty(content_type))
    assert [i.name for i in inputs] == [f"photos/{i // 10}/{i:02d}.png" for i in range(50)]
    assert [i.data for i in inputs] == [_png(i) for i in range(50)]
    assert all(i.error is None and i.pixels is None for i in inputs)


def test_one_image_in_an_archive_is_still_a_list() -> None:
    assert [i.name for i in _archive(ZIP, _zip([("a.png", _png(0))]))] == ["a.png"]


def test_archive_types_are_listed_when_a_type_is_refused() -> None:
    assert {ZIP, TAR, "application/gzip"} <= READABLE_TYPES
    with pytest.raises(UnsupportedMediaTypeError, match=r"application/x-tar, .*application/zip"):
        _inputs("application/x-7z-compressed", b"7z")


def test_folders_links_hidden_files_and_os_junk_are_skipped() -> None:
    link = zipfile.ZipInfo("link.png")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    zipped = _zip(
        [
            ("photos/", b""),
            ("./a.png", _png(1)),
            ("__MACOSX/photos/._a.png", b"AppleDouble"),
            (".DS_Store", b"Bud1"),
            ("photos/.hidden.png", _png(2)),
            (".git/objects/ab", b"blob"),
            ("photos\\Thumbs.db", b"thumbs"),
            (link, b"/etc/passwd"),
            ("photos/b.png", _png(3)),
        ]
    )
    assert [i.name for i in _archive(ZIP, zipped)] == ["./a.png", "photos/b.png"]
    tarred = _tar(
        [
            (_tar_entry("photos", tarfile.DIRTYPE), b""),
            ("./photos/a.png", _png(1)),
            (_tar_entry("photos/link.png", tarfile.SYMTYPE), b""),
            (_tar_entry("photos/hard.png", tarfile.LNKTYPE), b""),
            (_tar_entry("photos/fifo", tarfile.FIFOTYPE), b""),
            ("photos/._a.png", b"AppleDouble"),
            ("photos/.DS_Store", b"Bud1"),
            ("photos/b.png", _png(3)),
        ]
    )
    assert [i.name for i in _archive(TAR, tarred)] == ["./photos/a.png", "photos/b.png"]


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_more_entries_than_four_an_image_are_refused_before_any_is_read(kind: str) -> None:
    """Folders and links are skipped, but each costs a header: 4 x 4 images + 64 at most."""
    folders = [f"{i}/" for i in range(81)]
    if kind == "zip":
        content_type, body = ZIP, _zip([*((f, b"") for f in folders), ("a.png", _png(0))])
    else:
        links = [(_tar_entry(f"{i}.png", tarfile.SYMTYPE), b"") for i in range(81)]
        content_type, body = TAR, _tar([*links, ("a.png", _png(0))])
    with pytest.raises(
        PayloadTooLargeError, match=r"more than 80 entries .* 4 images .*\(SERVE_MAX_IMAGES\)$"
    ):
        _archive(content_type, body, BUDGET)


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("zip", r"zeros\.png declares 209,715,200 bytes; the limit is 6,291,456 bytes"),
        ("tar.gz", r"the archive decompresses to more than 6\.6 MB of tar"),  # and its headers
    ],
)
def test_a_bomb_is_refused_from_its_headers_before_it_is_unpacked(kind: str, words: str) -> None:
    body = _zip_of_zeros(200 * MiB) if kind == "zip" else _tar_gz_of_zeros(200 * MiB)
    assert len(body) < MiB
    tracemalloc.start()
    try:
        with pytest.raises(
            PayloadTooLargeError, match=rf"^{words}.*\(SAGEMAKER_MAX_PAYLOAD_IN_MB\)$"
        ):
            _archive(ZIP if kind == "zip" else TAR, body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB  # a .tar.gz is decompressed up to the limit, no further


def test_the_images_of_an_archive_together_are_held_to_the_limit() -> None:
    body = _zip([(f"{i}.png", bytes(600)) for i in range(3)])
    assert len(_archive(ZIP, body, max_unpacked_bytes=1800)) == 3
    with pytest.raises(
        PayloadTooLargeError,
        match=r"3 images declare 1,800 bytes; the limit is 1,000 bytes unpacked per request, "
        r"send fewer .*\(SAGEMAKER_MAX_PAYLOAD_IN_MB\)$",
    ):
        _archive(ZIP, body, max_unpacked_bytes=1000)


@pytest.mark.parametrize(
    ("declared", "error"),
    [
        (1000, "fails its CRC check"),  # 20 MiB of zeros declared as 1,000 bytes: read no further
        (30 * MiB, "holds 20,971,520 of the 31,457,280 bytes its header declares"),
    ],
)
def test_a_zip_header_that_lies_about_a_size_fails_that_member_alone(
    declared: int, error: str
) -> None:
    body = _zip_of_zeros(20 * MiB, ("a.png", _png(1)), ("b.png", _png(2)))
    body = _central(body, "zeros.png", 24, declared.to_bytes(4, "little"))
    tracemalloc.start()
    try:
        inputs = _archive(ZIP, body, max_unpacked_bytes=64 * MiB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(i.name, i.data is None) for i in inputs] == [
        ("zeros.png", True),
        ("a.png", False),
        ("b.png", False),
    ]
    assert inputs[0].error is not None
    assert error in inputs[0].error
    assert peak < (2 if declared < MiB else 64) * MiB


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_member_that_cannot_be_read_out_fails_alone(kind: str) -> None:
    images = [_png(i) for i in range(3)]
    members = [(f"{i}.png", image) for i, image in enumerate(images)]
    if kind == "zip":  # a flipped byte in the middle image: a CRC error
        body = bytearray(_zip(members, zipfile.ZIP_STORED))
        body[body.index(images[1]) + 20] ^= 0xFF
        error = "fails its CRC check"
        broken = 1
    else:  # cut inside the last image: the end of the body is lost
        body = bytearray(_tar(members))
        del body[body.index(images[2]) + 20 :]
        error = "is cut short"
        broken = 2
    inputs = _archive(TAR if kind == "tar" else ZIP, bytes(body))
    assert [i.name for i in inputs] == ["0.png", "1.png", "2.png"]
    for i, item in enumerate(inputs):
        if i == broken:
            assert (item.data, item.pixels) == (None, None)
            assert item.error is not None
            assert item.error.startswith(error)
        else:
            assert (item.data, item.error) == (images[i], None)


def test_an_encrypted_zip_member_is_refused_by_name() -> None:
    body = _zip([("a.png", _png(1)), ("secret\x1b.png", _png(2))])
    body = _central(body, "secret\x1b.png", 8, b"\x01")  # general purpose flag bit 0
    with pytest.raises(
        BadRequestError, match=r"^secret\?\.png is encrypted; make the archive without a password$"
    ):
        _archive(ZIP, body)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (ZIP, b"not a zip"),
        (ZIP, _png(1)),
        (ZIP, _zip([("a.png", _png(1))])[:-10]),  # cut short: no end of central directory
        (TAR, _png(1)),
        (TAR, b"x" * 2000),
        ("application/gzip", b"\x1f\x8b not gzip"),
        ("application/gzip", _tar([("a.png", _png(1))], "w:gz")[:-30]),  # cut short
        ("application/gzip", gzip.compress(_png(1))),  # gzip, but not of a tar
    ],
    ids=[
        "text",
        "png-as-zip",
        "cut-zip",
        "png-as-tar",
        "text-as-tar",
        "bad-gzip",
        "cut-gzip",
        "gzip-png",
    ],
)
def test_a_body_that_is_not_an_archive_of_its_type_is_a_bad_request(
    content_type: str, body: bytes
) -> None:
    with pytest.raises(BadRequestError, match=r"send the images as the files of a \.zip"):
        _archive(content_type, body)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (ZIP, _zip([])),
        (TAR, _tar([])),
        (ZIP, _zip([("photos/", b""), ("__MACOSX/._a.png", b"x"), (".DS_Store", b"x")])),
    ],
    ids=["empty-zip", "empty-tar", "only-junk"],
)
def test_an_archive_without_images_is_a_bad_request(content_type: str, body: bytes) -> None:
    with pytest.raises(BadRequestError, match="the archive holds no image files"):
        _archive(content_type, body)


def test_archive_paths_are_made_safe_to_show() -> None:
    long = "a/" * 150 + "b.png"
    body = _zip([("evil\x1b[31m\r\n.png", _png(1)), (long, _png(2))])
    assert [i.name for i in _archive(ZIP, body)] == ["evil?[31m??.png", long[:200] + "..."]
    # a central directory name of no length, whose one byte becomes an extra field
    nameless = _central(_zip([("z", _png(3))]), "z", 28, b"\x00\x00\x01\x00")
    (item,) = _archive(ZIP, nameless)
    assert item.name == "(a file with no name)"
    assert item.error is not None
    assert item.error.startswith("has a damaged local header")


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, JSON),
        ("", JSON),
        ("*/*", JSON),
        ("application/*", JSON),
        ("application/json; charset=utf-8", JSON),
        ("application/x-jsonlines", JSONLINES),
        ("text/html;q=0.9, application/jsonlines;q=0.8", JSONLINES),
        ("application/jsonlines;q=0.1, application/json;q=0.9", JSON),
    ],
)
def test_accept_negotiation(accept: str | None, expected: str) -> None:
    assert choose_response_type(accept, JSON) == expected


def test_accept_default_and_refusal() -> None:
    assert choose_response_type("*/*", JSONLINES) == JSONLINES
    with pytest.raises(NotAcceptableError):
        choose_response_type("image/png", JSON)
    with pytest.raises(NotAcceptableError):
        choose_response_type("application/json;q=nonsense", JSON)


ENDPOINT = Override()  # the endpoint's settings: abstain on, no min_confidence


def test_abstention_attributes_override_the_endpoint() -> None:
    assert parse_custom_attributes(None, 5, ENDPOINT).override == ENDPOINT
    options = parse_custom_attributes("min_confidence=0.5, abstain=off", 5, ENDPOINT)
    assert options.override == Override(abstain=False, min_confidence=0.5)
    strict = Override(abstain=True, min_confidence=0.9)
    assert parse_custom_attributes("top_k=2", 5, strict).override == strict
    assert parse_custom_attributes("abstain=ON", 5, Override(abstain=False)).override.abstain
    assert parse_custom_attributes("min_confidence=1", 5, strict).override.min_confidence == 1.0


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "half", "0.5.1", "1e-3", "", "nan"])
def test_min_confidence_is_a_probability_above_0(value: str) -> None:
    with pytest.raises(BadRequestError, match=r"min_confidence=.*: use a probability above 0"):
        parse_custom_attributes(f"min_confidence={value}", 5, ENDPOINT)


def test_abstain_is_on_or_off() -> None:
    with pytest.raises(BadRequestError, match="abstain='maybe': use on or off"):
        parse_custom_attributes("abstain=maybe", 5, ENDPOINT)


def test_custom_attributes() -> None:
    options = parse_custom_attributes("top_k=3; explain=GradCAM, id=r1, unknown=x", 5, ENDPOINT)
    assert (options.top_k, options.explain, options.request_id) == (3, True, "r1")
    default = parse_custom_attributes(None, 5, ENDPOINT)
    assert (default.top_k, default.explain, default.request_id) == (5, False, None)
    assert parse_custom_attributes("free text without pairs", 5, ENDPOINT).top_k == 5


@pytest.mark.parametrize("top_k", ["0", "1001", "²", "٣", "1_0", "+3", " ", "3.0", "00003"])
def test_top_k_is_ascii_1_to_1000(top_k: str) -> None:
    with pytest.raises(BadRequestError, match=r"top_k=.*: use a whole number from 1 to 1000"):
        parse_custom_attributes(f"top_k={top_k}", 5, ENDPOINT)


@pytest.mark.parametrize("request_id", ["abc-123", "ns:run.1_2", "a" * 64, "0"])
def test_request_ids_that_are_echoed(request_id: str) -> None:
    assert parse_custom_attributes(f"request_id={request_id}", 5, ENDPOINT).request_id == request_id


@pytest.mark.parametrize(
    "request_id", ["", "a" * 65, "a b", "ünïcode", "x\x1b[31m", "<script>", "a\r\nSet-Cookie: x"]
)
def test_request_ids_outside_the_safe_form_are_refused(request_id: str) -> None:
    with pytest.raises(BadRequestError, match="use 1 to 64 characters of A-Z, a-z, 0-9") as raised:
        parse_custom_attributes(f"top_k=3, id={request_id}", 5, ENDPOINT)
    assert "\x1b" not in raised.value.message
    assert "\n" not in raised.value.message


def test_encode_shapes() -> None:
    records = [{"predictions": [1]}, {"predictions": [2]}]
    extra = {"model_version": "v"}
    assert json.loads(encode(records[:1], JSON, False, extra)) == {"predictions": [1], **extra}
    assert json.loads(encode(records, JSON, True, extra)) == {"results": records, **extra}
    lines = encode(records, JSONLINES, True, extra).decode().splitlines()
    assert [json.loads(line) for line in lines] == [{**r, **extra} for r in records]


def test_settings_from_the_environment() -> None:
    settings = ServeSettings.from_environ(
        {
            "SAGEMAKER_BIND_TO_PORT": "9000",
            "SAGEMAKER_MAX_PAYLOAD_IN_MB": "12",
            "SAGEMAKER_BATCH": "true",  # batch transform's hints: read by nothing
            "SAGEMAKER_BATCH_STRATEGY": "multi_record",
            "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "Application/JSONLines",
            "SERVE_MAX_BATCH_SIZE": "32",
            "SERVE_DEVICE": "CPU",
            "SERVE_OPTIMIZE": "Auto",  # jit here: one model
            "UNRELATED": "ignored",
        }
    )
    assert settings.port == 9000
    assert settings.max_payload_bytes == 12 << 20
    assert settings.optimization == "jit"
    assert settings.default_accept == JSONLINES
    assert settings.max_batch_size == 32
    assert settings.device == "cpu"
    assert "SAGEMAKER_BIND_TO_PORT=9000" in settings.describe()
    assert ServeSettings.from_environ({}).port == 8080


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGEMAKER_BIND_TO_PORT", "99999"),
        ("SAGEMAKER_BIND_TO_PORT", "eighty"),
        ("SERVE_MAX_BATCH_SIZE", "0"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "2000"),
        ("SERVE_DEVICE", "gpu"),
        ("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv"),
        ("SERVE_PRECISION", "int4"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}='{value}' is invalid"):
        ServeSettings.from_environ({variable: value})


def test_a_multi_model_endpoint_with_several_workers_is_refused() -> None:
    with pytest.raises(
        SettingsError, match=r"one server process .* set SAGEMAKER_MODEL_SERVER_WORKERS=1"
    ):
        ServeSettings.from_environ(
            {"SAGEMAKER_MULTI_MODEL": "true", "SAGEMAKER_MODEL_SERVER_WORKERS": "2"}
        )
