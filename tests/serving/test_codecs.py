"""Request and response codecs, the custom-attribute parser and the settings reader."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest

from container.serving.codecs import (
    JSON,
    JSONLINES,
    choose_response_type,
    encode,
    parse_custom_attributes,
    read_inputs,
)
from container.serving.errors import (
    BadRequestError,
    NotAcceptableError,
    UnsupportedMediaTypeError,
)
from container.serving.settings import ServeSettings, SettingsError


def _read(content_type: str | None, body: bytes) -> tuple[list[str], bool]:
    inputs, many = asyncio.run(read_inputs(content_type, body))
    return [i.name for i in inputs], many


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
    inputs, many = asyncio.run(read_inputs(f"multipart/form-data; boundary={boundary}", body))
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
        asyncio.run(read_inputs(content_type, body))


def test_jsonlines_names_the_bad_line() -> None:
    body = b'{"b64": "AAAA"}\n{"b64": 7}\n'
    with pytest.raises(BadRequestError, match="line 2: expected a base64 string"):
        asyncio.run(read_inputs("application/jsonlines", body))


def test_json_single_and_lists() -> None:
    b64 = base64.b64encode(b"img").decode()
    assert _read(JSON, json.dumps(b64).encode()) == (["image"], False)
    assert _read(JSON, json.dumps([b64, b64]).encode()) == (["image 0", "image 1"], True)
    assert _read(JSON, json.dumps({"images": [b64]}).encode()) == (["image 0"], True)


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


def test_custom_attributes() -> None:
    options = parse_custom_attributes("top_k=3; explain=GradCAM, id=r1, unknown=x", 5)
    assert (options.top_k, options.explain, options.request_id) == (3, True, "r1")
    default = parse_custom_attributes(None, 5)
    assert (default.top_k, default.explain, default.request_id) == (5, False, None)
    assert parse_custom_attributes("free text without pairs", 5).top_k == 5


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
            "SAGEMAKER_BATCH": "true",
            "SAGEMAKER_BATCH_STRATEGY": "multi_record",
            "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT": "Application/JSONLines",
            "SERVE_MAX_BATCH_SIZE": "32",
            "UNRELATED": "ignored",
        }
    )
    assert settings.port == 9000
    assert settings.max_payload_bytes == 12 << 20
    assert settings.batch_transform
    assert settings.batch_strategy == "MULTI_RECORD"
    assert settings.default_accept == JSONLINES
    assert settings.max_batch_size == 32
    assert "SAGEMAKER_BIND_TO_PORT=9000" in settings.describe()
    assert ServeSettings.from_environ({}).port == 8080


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SAGEMAKER_BIND_TO_PORT", "99999"),
        ("SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT", "text/csv"),
        ("SERVE_PRECISION", "int4"),
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "0"),
    ],
)
def test_bad_settings_name_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError, match=f"{variable}='{value}' is invalid"):
        ServeSettings.from_environ({variable: value})
