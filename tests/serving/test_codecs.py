"""Request and response codecs, the custom-attribute parser and the settings reader."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tracemalloc

import numpy as np
import pytest

from container.abstention import Override
from container.serving.budget import RequestBudget
from container.serving.codecs import (
    JSON,
    JSONLINES,
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
    return NPY, _npy(np.zeros((5, 4, 4, 3), np.uint8))


@pytest.mark.parametrize("kind", ["json list", "json instances", "json lines", "multipart", "npy"])
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
            "SERVE_OPTIMIZE": "Auto",  # the old name of jit
            "UNRELATED": "ignored",
        }
    )
    assert settings.port == 9000
    assert settings.max_payload_bytes == 12 << 20
    assert settings.optimize == "jit"
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
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "500"),
        ("SERVE_DEVICE", "gpu"),
        ("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv"),
        ("SERVE_PRECISION", "int4"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}='{value}' is invalid"):
        ServeSettings.from_environ({variable: value})
