"""`launch explain`: a Grad-CAM gallery from the real `serve` process, and a Clarify job on moto."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from container.sagemaker_env import OptMl
from tests.launch.conftest import Launch, StandInHandler, one_line_error, stand_in
from tests.launch.test_hosting import deploy
from tests.serving.conftest import Server


@pytest.fixture
def jpegs(trained: OptMl, tmp_path: Path) -> Path:
    """Three held-out JPEGs of the trained model, in nested class folders."""
    found = sorted(trained.channel_dir("test").rglob("*.jpg"))[:3]
    assert len(found) == 3
    folder = tmp_path / "images"
    for path in found:
        target = folder / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return folder


def _class_names(trained: OptMl) -> set[str]:
    classes: Any = json.loads((trained.model_dir / "classes.json").read_text())
    return {str(n) for n in (classes.values() if isinstance(classes, dict) else classes)}


def test_gallery_from_a_local_server(
    launch: Launch,
    server: Server,
    trained: OptMl,
    jpegs: Path,
) -> None:
    out = launch.cwd / "gallery.html"
    done = launch.ok("explain", str(jpegs), "--url", server.url, "--out", str(out), "--top-k", "2")
    assert f"{out}: 3 image(s)" in done.stdout
    page = out.read_text()
    assert page.startswith("<!doctype html>")
    assert page.count("<img") == 6  # each image and its overlay
    assert page.count('src="data:image/png;base64,') == 3  # the overlays, inline
    assert page.count('src="data:image/jpeg;base64,') == 3  # the images, inline
    assert "http" not in page.replace(server.url, "")  # self-contained: nothing to fetch
    for path in jpegs.rglob("*.jpg"):
        assert f'alt="Grad-CAM of {path.name}"' in page
    shown = re.findall(r"<tr><td>([^<]+)</td><td>([0-9.]+)%</td></tr>", page)
    assert len(shown) == 3 * 2  # --top-k 2 per image
    assert {label for label, _ in shown} <= _class_names(trained)
    assert all(0 <= float(p) <= 100 for _, p in shown)


@pytest.fixture
def runtime(server: Server) -> Iterator[str]:
    """A stand-in for the SageMaker runtime API in front of the real `serve` process.

    moto cannot take InvokeEndpoint with a binary body, so the test runs its own: POST
    /endpoints/NAME/invocations forwarded to the server's /invocations with the headers SageMaker
    passes through (Content-Type, Accept, X-Amzn-SageMaker-Custom-Attributes), as SageMaker does.
    """

    class Forward(StandInHandler):
        def post(self, body: bytes) -> None:
            assert re.fullmatch(r"/endpoints/[^/]+/invocations", self.path), self.path
            passed = ("Content-Type", "Accept", "X-Amzn-SageMaker-Custom-Attributes")
            answer = httpx.post(
                f"{server.url}/invocations",
                content=body,
                headers={k: self.headers[k] for k in passed if self.headers[k]},
                timeout=60,
            )
            self.answer(answer.status_code, answer.headers["content-type"], answer.content)

    with stand_in(Forward) as url:
        yield url


def test_gallery_from_an_endpoint(launch: Launch, runtime: str, jpegs: Path) -> None:
    deploy(launch, "--endpoint-name", "dogs-gpu")
    out = launch.cwd / "endpoint.html"
    done = launch(
        "explain",
        str(jpegs),
        "--endpoint",
        "dogs-gpu",
        "--out",
        str(out),
        env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": runtime},
    )
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "Grad-CAM from endpoint dogs-gpu" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert len(re.findall(r"<tr><td>", page)) == 3 * 3  # the default --top-k 3


def _folder(tmp_path: Path, *names: str) -> Path:
    """A folder of files that start as a JPEG does (the commands below never decode them)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        (folder / name).write_bytes(b"\xff\xd8\xff")
    return folder


def test_local_server_not_running_is_one_line(launch: Launch, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg")
    done = launch("explain", str(folder), "--url", "http://127.0.0.1:9")
    assert "cannot reach http://127.0.0.1:9" in one_line_error(done)


def test_unknown_endpoint_is_one_line(launch: Launch, tmp_path: Path) -> None:
    folder = _folder(tmp_path, "a.jpg")
    done = launch("explain", str(folder), "--endpoint", "no-such-endpoint")
    assert one_line_error(done) == (
        "launch: no endpoint 'no-such-endpoint' in us-east-1: launch deploy prints its name"
    )
    assert not (launch.cwd / "gallery.html").exists()


def test_clarify_job_request(launch: Launch, tmp_path: Path) -> None:
    deploy(launch, "--no-wait", "--prefix", "dogs")
    sagemaker = launch.client("sagemaker")
    (model,) = sagemaker.list_models()["Models"]
    folder = _folder(tmp_path, "a.jpg", "b.jpg")
    done = launch.ok(
        "explain",
        str(folder),
        "--clarify",
        model["ModelName"],
        "--num-segments",
        "30",
        "--num-samples",
        "64",
        "--bucket",
        "clarify-bucket",
        "--prefix",
        "dogs",
    )
    name = re.search(r"^clarify job: (\S+)", done.stdout, re.MULTILINE)
    assert name, done.stdout
    job = sagemaker.describe_processing_job(ProcessingJobName=name.group(1))
    assert "sagemaker-clarify-processing" in job["AppSpecification"]["ImageUri"]
    inputs = {i["InputName"]: i["S3Input"]["S3Uri"] for i in job["ProcessingInputs"]}
    prefix = f"s3://clarify-bucket/dogs/{name.group(1)}"
    assert inputs["dataset"] == f"{prefix}/images"
    (output,) = job["ProcessingOutputConfig"]["Outputs"]
    assert output["S3Output"]["S3Uri"] == f"{prefix}/report"

    s3 = launch.client("s3")
    listed = s3.list_objects_v2(Bucket="clarify-bucket", Prefix=f"dogs/{name.group(1)}/images/")
    assert sorted(o["Key"].rsplit("/", 1)[-1] for o in listed["Contents"]) == ["a.jpg", "b.jpg"]
    bucket, key = inputs["analysis_config"].removeprefix("s3://").split("/", 1)
    config = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert config["dataset_type"] == "application/x-image"
    shap = config["methods"]["shap"]
    assert shap["num_samples"] == 64
    assert shap["image_config"] == {
        "model_type": "IMAGE_CLASSIFICATION",
        "num_segments": 30,
        "feature_extraction_method": "segmentation",
    }
    predictor = config["predictor"]
    assert predictor["model_name"] == model["ModelName"]
    assert predictor["content_type"] == "image/jpeg"
    assert predictor["accept_type"] == "application/json"
    assert predictor["custom_attributes"] == "top_k=1000"
    assert predictor["probability"] == "sort_by(predictions, &index)[].probability"


def test_clarify_unknown_model_is_one_line(launch: Launch, tmp_path: Path) -> None:
    done = launch("explain", str(_folder(tmp_path, "a.jpg")), "--clarify", "no-such-model")
    assert one_line_error(done) == (
        "launch: no model 'no-such-model' in us-east-1: launch deploy prints its name"
    )
