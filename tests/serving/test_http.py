"""The server's HTTP surface (the app in this process, see `in_process`): every content type,
Accept, option and error status."""

from __future__ import annotations

import base64
import io
import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from container.model import load_artifact
from container.sagemaker_env import OptMl
from tests.serving.conftest import (
    QUICK,
    App,
    Server,
    encoded,
    in_process,
    jpeg,
    photo,
    serve_settings,
)

MiB = 1 << 20


@pytest.fixture(scope="module")
def dog(test_images: list[Path]) -> bytes:
    """A held-out JPEG of the sample dataset."""
    return next(p for p in test_images if p.suffix == ".jpg").read_bytes()


def _top1(response: object) -> str:
    assert isinstance(response, dict)
    return str(response["predictions"][0]["label"])


def test_jpeg(app: App, dog: bytes, trained: OptMl) -> None:
    response = app.post(dog)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    artifact = load_artifact(trained.model_dir)
    assert body["model_version"] == artifact.model_version
    predictions = body["predictions"]
    assert len(predictions) == 4  # top 5 of 4 classes
    assert [p["label"] for p in predictions] == [artifact.classes[p["index"]] for p in predictions]
    probabilities = [p["probability"] for p in predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize(
    "content_type",
    ["image/png", "image/webp", "application/x-image", "application/octet-stream", "image/jpg"],
)
def test_image_types_are_sniffed(app: App, dog: bytes, content_type: str) -> None:
    expected = _top1(app.post(dog).json())
    image = Image.open(io.BytesIO(dog))
    body = encoded(image, "PNG") if content_type == "image/png" else dog
    body = encoded(image, "WEBP", lossless=True) if content_type == "image/webp" else body
    response = app.post(body, content_type)
    assert response.status_code == 200, response.text
    assert _top1(response.json()) == expected


def test_multipart_one_and_many_files(app: App, test_images: list[Path]) -> None:
    files = [p for p in test_images if p.suffix == ".jpg"][:3]
    singles = [_top1(app.post(p.read_bytes()).json()) for p in files]
    one = app.client.post("/invocations", files={"image": ("a.jpg", files[0].read_bytes())})
    assert one.status_code == 200, one.text
    assert _top1(one.json()) == singles[0]
    many = app.client.post(
        "/invocations",
        files=[("image", (p.name, p.read_bytes(), "image/jpeg")) for p in files],
        data={"note": "plain fields are ignored"},
    )
    assert many.status_code == 200, many.text
    results = many.json()["results"]
    assert [r["image"] for r in results] == [p.name for p in files]
    assert [r["predictions"][0]["label"] for r in results] == singles


def test_json_base64_one_or_many(app: App, dog: bytes, test_images: list[Path]) -> None:
    expected = _top1(app.post(dog).json())
    b64 = base64.b64encode(dog).decode()
    for document in (b64, {"b64": b64}, {"image": b64}, f"data:image/jpeg;base64,{b64}"):
        response = app.post(json.dumps(document).encode(), "application/json")
        assert response.status_code == 200, response.text
        assert _top1(response.json()) == expected
    others = [base64.b64encode(p.read_bytes()).decode() for p in test_images[:3]]
    for document in ({"instances": [b64, *others]}, [b64, *others], {"instances": [{"b64": b64}]}):
        response = app.post(json.dumps(document).encode(), "application/json")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert results[0]["predictions"][0]["label"] == expected
        assert [r["image"] for r in results] == [f"image {i}" for i in range(len(results))]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def test_npy_arrays(app: App, dog: bytes) -> None:
    pixels = np.asarray(Image.open(io.BytesIO(dog)).convert("RGB"))
    expected = _top1(app.post(encoded(Image.fromarray(pixels), "PNG"), "image/png").json())
    for array in (pixels, pixels.astype(np.float32) / 255, pixels.transpose(2, 0, 1)):
        response = app.post(_npy(array), "application/x-npy")
        assert response.status_code == 200, response.text
        assert _top1(response.json()) == expected
    batch = app.post(_npy(np.stack([pixels, pixels[:, ::-1]])), "application/x-npy")
    assert batch.status_code == 200, batch.text
    assert len(batch.json()["results"]) == 2
    sniffed = app.post(_npy(pixels), "application/octet-stream")
    assert _top1(sniffed.json()) == expected


def test_npy_with_pickled_objects_is_refused_not_unpickled(app: App) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"payload": "would run on load"}], dtype=object), allow_pickle=True)
    response = app.post(buffer.getvalue(), "application/x-npy")
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


def test_jsonlines_records_for_batch_transform(app: App, test_images: list[Path]) -> None:
    lines = [
        json.dumps({"b64": base64.b64encode(p.read_bytes()).decode()}) for p in test_images[:4]
    ]
    body = ("\n".join(lines) + "\n").encode()
    response = app.post(body, "application/jsonlines", accept="application/jsonlines")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/jsonlines"
    out = [json.loads(line) for line in response.text.splitlines()]
    assert len(out) == 4
    assert [r["image"] for r in out] == ["line 1", "line 2", "line 3", "line 4"]
    assert all("model_version" in r for r in out)
    as_json = app.post(body, "application/jsonlines")
    assert [r["predictions"] for r in as_json.json()["results"]] == [r["predictions"] for r in out]


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        (None, "application/json"),
        ("*/*", "application/json"),
        ("application/json", "application/json"),
        ("application/jsonlines", "application/jsonlines"),
        ("text/html, application/jsonlines;q=0.5", "application/jsonlines"),
        ("application/json;q=0.2, application/jsonlines", "application/jsonlines"),
    ],
)
def test_accept(app: App, dog: bytes, accept: str | None, expected: str) -> None:
    headers = {} if accept is None else {"accept": accept}
    response = app.post(dog, **headers)
    assert response.status_code == 200
    assert response.headers["content-type"] == expected


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "application/json;q=0"])
def test_unacceptable(app: App, dog: bytes, accept: str) -> None:
    response = app.post(dog, accept=accept)
    assert response.status_code == 406
    body = response.json()
    assert body["error"] == "not_acceptable"
    assert "application/json or application/jsonlines" in body["message"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "video/mp4", None])
def test_unsupported_content_type_even_on_a_valid_image(
    app: App, dog: bytes, content_type: str | None
) -> None:
    response = app.post(dog, content_type)
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"
    assert "image/jpeg" in response.json()["message"]


def test_json_content_type_on_jpeg_bytes(app: App, dog: bytes) -> None:
    response = app.post(dog, "application/json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["message"]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"", "the request body is empty"),
        (b"definitely not an image", "the image is not usable"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "the image is not usable"),
    ],
)
def test_bad_bodies(app: App, body: bytes, words: str) -> None:
    response = app.post(body)
    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert words in response.json()["message"]


def test_truncated_jpeg(app: App, dog: bytes) -> None:
    response = app.post(dog[: len(dog) // 2])
    assert response.status_code == 400
    assert "truncated" in response.json()["message"]


def test_the_bad_image_of_many_is_named_in_its_own_result(app: App, dog: bytes) -> None:
    files = [("good.jpg", dog), ("cut.jpg", dog[:300]), ("good2.jpg", dog)]
    response = app.client.post("/invocations", files=[("image", f) for f in files])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["image"] for r in results] == ["good.jpg", "cut.jpg", "good2.jpg"]
    assert results[0]["predictions"] == results[2]["predictions"]
    assert "predictions" not in results[1]
    assert results[1]["error"] == "bad_request"
    assert results[1]["message"].startswith("cut.jpg: ")


def test_a_request_whose_images_all_fail_is_refused(app: App, dog: bytes) -> None:
    files = [("cut.jpg", dog[:300]), ("text.jpg", b"not an image")]
    response = app.client.post("/invocations", files=[("image", f) for f in files])
    assert response.status_code == 400
    message = response.json()["message"]
    assert message.startswith("all 2 images are not usable: cut.jpg: ")
    assert "text.jpg: " in message


@pytest.mark.parametrize(
    ("document", "words"),
    [
        ({"instances": []}, "empty list"),
        ({"instances": ["@@not base64@@"]}, "image 0: not valid base64"),
        ({"instances": [42]}, "expected a base64 string"),
        ({"unrelated": "x"}, "needs a 'b64' field"),
    ],
)
def test_bad_json(app: App, document: object, words: str) -> None:
    response = app.post(json.dumps(document).encode(), "application/json")
    assert response.status_code == 400
    assert words in response.json()["message"]


def test_payload_cap(app: App, dog: bytes) -> None:
    over = app.post(b"\xff" * (6 * MiB + 1))
    assert over.status_code == 413
    assert over.json()["error"] == "payload_too_large"
    assert "6291456" in over.json()["message"]
    padded = dog + b"\x00" * (6 * MiB - len(dog))  # exactly at the cap: read, then judged
    assert app.post(padded).status_code == 200


def test_decompression_bomb_is_refused_before_decoding(app: App) -> None:
    bomb = encoded(Image.new("1", (30_000, 30_000)), "PNG", optimize=True)
    assert len(bomb) < MiB  # tiny on the wire, 900 megapixels decoded
    response = app.post(bomb, "image/png")
    assert response.status_code == 413
    assert "use a smaller image (SERVE_MAX_IMAGE_PIXELS)" in response.json()["message"]
    medium = encoded(Image.new("1", (8_000, 8_000)), "PNG", optimize=True)  # 64 MP > 40 MP
    response = app.post(medium, "image/png")
    assert response.status_code == 413
    assert "8000x8000 pixels (64 MP); the limit is 40 MP per image" in response.json()["message"]


def test_exif_rotation_is_applied(app: App, dog: bytes) -> None:
    image = Image.open(io.BytesIO(dog)).convert("RGB")
    upright = _top1(app.post(jpeg(image, quality=95)).json())
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; displays (and must be judged) upright
    stored = image.transpose(Image.Transpose.ROTATE_90)
    rotated = app.post(jpeg(stored, quality=95, exif=exif.tobytes()))
    assert rotated.status_code == 200
    assert _top1(rotated.json()) == upright


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("L", "JPEG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
    ],
)
def test_colour_modes(app: App, dog: bytes, mode: str, fmt: str) -> None:
    image = Image.open(io.BytesIO(dog)).convert(mode)
    response = app.post(encoded(image, fmt), f"image/{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 4


def test_large_photo(app: App) -> None:
    response = app.post(jpeg(photo(3000, 2000), quality=90))
    assert response.status_code == 200


def test_custom_attributes(app: App, dog: bytes) -> None:
    response = app.post(dog, x_amzn_sagemaker_custom_attributes="top_k=2, request_id=abc-123")
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 2
    assert response.headers["x-amzn-sagemaker-custom-attributes"] == "request_id=abc-123"
    generated = app.post(dog).headers["x-amzn-sagemaker-custom-attributes"]
    assert generated.startswith("request_id=")
    assert len(generated) > len("request_id=")


@pytest.mark.parametrize(
    ("attributes", "words"),
    [("top_k=0", "top_k='0'"), ("top_k=many", "top_k='many'"), ("explain=lime", "gradcam")],
)
def test_bad_custom_attributes(app: App, dog: bytes, attributes: str, words: str) -> None:
    response = app.post(dog, x_amzn_sagemaker_custom_attributes=attributes)
    assert response.status_code == 400
    assert words in response.json()["message"]


def test_platform_headers_are_tolerated(app: App, dog: bytes) -> None:
    response = app.post(
        dog,
        x_amzn_sagemaker_target_model="model.tar.gz",
        x_amzn_sagemaker_target_variant="AllTraffic",
        x_amzn_sagemaker_inference_id="abc",
        x_amzn_sagemaker_enable_explanations="`true`",
    )
    assert response.status_code == 200


def _zip(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def test_a_zip_of_50_images_gets_50_results_in_order_the_corrupt_one_named(
    app: App, test_images: list[Path]
) -> None:
    members = [(f"batch/{i:02d}-{p.name}", p.read_bytes()) for i, p in enumerate(test_images * 3)]
    members = members[:50]
    members[17] = ("batch/17-corrupt.jpg", b"\xff\xd8\xff\xe0 this is no JPEG")
    response = app.post(_zip(members), "application/zip")
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["image"] for r in results] == [name for name, _ in members]
    assert results[17]["error"] == "bad_request"
    assert results[17]["message"].startswith("batch/17-corrupt.jpg: ")
    answered = [r for i, r in enumerate(results) if i != 17]
    assert all(len(r["predictions"]) == 4 for r in answered)
    # each image's answer is the one it gets alone
    alone = app.post(members[3][1], "application/octet-stream")
    batched, single = results[3]["predictions"], alone.json()["predictions"]
    assert [p["label"] for p in batched] == [p["label"] for p in single]
    for a, b in zip(batched, single, strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-3)


def test_a_tar_gz_of_images_is_answered_line_by_line(app: App, test_images: list[Path]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in test_images[:3]:
            archive.add(path, arcname=f"in/{path.name}")
    response = app.post(buffer.getvalue(), "application/gzip", accept="application/jsonlines")
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert [line["image"] for line in lines] == [f"in/{p.name}" for p in test_images[:3]]


def test_every_response_carries_content_length_never_chunked(server: Server, dog: bytes) -> None:
    """What SageMaker's asynchronous and batch paths need, on the real socket."""
    responses = [
        server.post(dog),
        server.post(_zip([("a.jpg", dog), ("b.jpg", b"broken")]), "application/zip"),
        server.post(dog, "text/csv"),
        server.client.get("/ping"),
        server.client.get("/execution-parameters"),
        server.client.get("/models"),
    ]
    assert [r.status_code for r in responses] == [200, 200, 415, 200, 200, 404]
    for response in responses:
        assert "transfer-encoding" not in response.headers
        assert int(response.headers["content-length"]) == len(response.content)


def test_a_raised_payload_cap_raises_the_request_budgets(trained: OptMl) -> None:
    """As an asynchronous endpoint's model sets it: 600 MiB takes 100 times the images of 6, and
    batch transform is still offered its own 100 MB at most."""
    tiny = base64.b64encode(jpeg(photo(24, 16))).decode()
    with in_process(serve_settings(trained, max_payload_mb=600, **QUICK)) as app:
        app.wait_until(200)
        many = app.post(json.dumps([tiny] * 200).encode(), "application/json")
        assert many.status_code == 200, many.text
        assert len(many.json()["results"]) == 200
        parameters = app.client.get("/execution-parameters").json()
        assert parameters["MaxPayloadInMB"] == 100
        assert parameters["MaxConcurrentTransforms"] == 1
    with in_process(serve_settings(trained, max_payload_mb=600, max_images=64, **QUICK)) as app:
        app.wait_until(200)
        refused = app.post(json.dumps([tiny] * 65).encode(), "application/json")
        assert refused.status_code == 413
        assert "SERVE_MAX_IMAGES" in refused.json()["message"]


def test_a_request_of_more_images_than_the_queue_holds_is_answered_a_window_at_a_time(
    trained: OptMl,
) -> None:
    tiny = [base64.b64encode(jpeg(photo(24, 16, seed=i))).decode() for i in range(10)]
    tiny[6] = base64.b64encode(b"no image").decode()
    with in_process(serve_settings(trained, max_queued_images=4, **QUICK)) as app:
        app.wait_until(200)
        response = app.post(json.dumps(tiny).encode(), "application/json")
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert [r["image"] for r in results] == [f"image {i}" for i in range(10)]
        assert [i for i, r in enumerate(results) if "error" in r] == [6]
        assert app.log_lines(r"status=200 .* images=10 ")


def test_execution_parameters(app: App) -> None:
    response = app.client.get("/execution-parameters")
    assert response.status_code == 200
    parameters = response.json()
    assert parameters["BatchStrategy"] == "SingleRecord"  # the API's spelling, one image each
    assert parameters["MaxPayloadInMB"] == 6
    assert 1 <= parameters["MaxConcurrentTransforms"] * parameters["MaxPayloadInMB"] <= 100


def test_unknown_routes_and_methods_answer_json(app: App) -> None:
    missing = app.client.get("/predict")
    assert missing.status_code == 404
    assert "POST /invocations" in missing.json()["message"]
    wrong = app.client.get("/invocations")
    assert wrong.status_code == 405
    assert wrong.json()["error"] == "method_not_allowed"


def test_one_log_line_per_request_without_the_image(app: App, dog: bytes) -> None:
    app.post(dog, x_amzn_sagemaker_custom_attributes="request_id=log-me")
    app.post(b"", x_amzn_sagemaker_custom_attributes="request_id=log-me-too")
    lines = app.logs().splitlines()
    (ok,) = [line for line in lines if "invocation log-me " in line]
    assert "status=200 type=image/jpeg" in ok
    assert f"bytes={len(dog)} images=1 batch=" in ok
    assert all(f in ok for f in ("decode=", "queue=", "model=", "total="))
    (failed,) = [line for line in lines if "invocation log-me-too " in line]
    assert "status=400" in failed
    # The body was raw bytes: logged, they would show as their repr or in hex.
    for leaked in (repr(dog[2:18])[2:-1], dog[2:18].hex(), base64.b64encode(dog[:30]).decode()):
        assert leaked not in app.logs()
