"""`launch transform`: the job SageMaker would receive (moto), and the fetch and accuracy part on
.out bodies the real `serve` wrote (moto never runs a job: it marks it Completed at once)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from container.class_names import class_name
from tests.launch.conftest import IMAGE_URI, ROLE, Launch, one_line_error
from tests.serving.conftest import Server

BUCKET = "dog-batch"
MODEL_DATA = f"s3://{BUCKET}/dog-classifier/model/model.tar.gz"


def _job(stdout: str) -> str:
    found = re.search(r"transform job (\S+) started", stdout)
    assert found, stdout
    return found.group(1)


def test_the_job_is_one_jpeg_per_request(launch: Launch) -> None:
    done = launch.ok(
        "transform",
        "--model-data", MODEL_DATA,
        "--input", f"s3://{BUCKET}/dog-classifier/data/test/",
        "--instance-type", "ml.g4dn.xlarge",
        "--max-concurrent-transforms", "4",
        "--transform-ami-version", "al2-ami-sagemaker-batch-gpu-535",
        "--no-wait",
        "--bucket", BUCKET,
    )  # fmt: skip
    sagemaker = launch.client("sagemaker")
    job = sagemaker.describe_transform_job(TransformJobName=_job(done.stdout))
    source = job["TransformInput"]["DataSource"]["S3DataSource"]
    assert source == {"S3DataType": "S3Prefix", "S3Uri": f"s3://{BUCKET}/dog-classifier/data/test/"}
    assert job["TransformInput"]["ContentType"] == "image/jpeg"
    assert job["TransformInput"].get("SplitType", "None") == "None"
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["MaxPayloadInMB"] == 6
    assert job["MaxConcurrentTransforms"] == 4
    assert job["TransformOutput"]["Accept"] == "application/json"
    assert job["TransformOutput"]["S3OutputPath"].startswith(
        f"s3://{BUCKET}/dog-classifier/transform/dog-classifier-transform-"
    )
    assert job["TransformResources"] == {
        "InstanceType": "ml.g4dn.xlarge",
        "InstanceCount": 1,
        "TransformAmiVersion": "al2-ami-sagemaker-batch-gpu-535",
    }
    assert job["ModelClientConfig"]["InvocationsTimeoutInSeconds"] == 600
    model = sagemaker.describe_model(ModelName=job["ModelName"])
    assert model["PrimaryContainer"]["Image"] == IMAGE_URI
    assert model["PrimaryContainer"]["ModelDataUrl"] == MODEL_DATA
    assert model["ExecutionRoleArn"] == ROLE
    assert f"launch transform --fetch-only {job['TransformJobName']}" in done.stdout


def test_a_gpu_type_gets_the_batch_ami_the_image_needs_and_serves_on_cuda(launch: Launch) -> None:
    done = launch.ok(
        "transform",
        "--model-data", MODEL_DATA,
        "--instance-type", "ml.g4dn.xlarge",
        "--no-wait",
        "--bucket", BUCKET,
    )  # fmt: skip
    assert "assuming CUDA 12.6, the Dockerfile's default" in done.stderr
    assert (
        "ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default; this image needs "
        "CUDA 12.6 -> driver 525+: TransformAmiVersion=al2-ami-sagemaker-batch-gpu-535 "
        "(driver 535)\n"
    ) in done.stdout
    (request,) = launch.sent("SageMaker.CreateTransformJob")
    assert request["TransformResources"] == {
        "InstanceType": "ml.g4dn.xlarge",
        "InstanceCount": 1,
        "TransformAmiVersion": "al2-ami-sagemaker-batch-gpu-535",
    }
    (model,) = launch.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {"SERVE_DEVICE": "cuda"}
    assert model["ModelName"] == request["ModelName"]


def test_a_cpu_type_gets_no_ami_and_no_device(launch: Launch) -> None:
    done = launch.ok("transform", "--model-data", MODEL_DATA, "--no-wait", "--bucket", BUCKET)
    assert "AmiVersion" not in done.stdout
    assert "label" not in done.stderr
    (request,) = launch.sent("SageMaker.CreateTransformJob")
    assert request["TransformResources"] == {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1}
    (model,) = launch.sent("SageMaker.CreateModel")
    assert "SERVE_DEVICE" not in model["PrimaryContainer"].get("Environment", {})


def test_an_ami_that_cannot_run_the_image_is_refused(launch: Launch) -> None:
    gpu = ("--instance-type", "ml.g4dn.xlarge")
    cases = {
        (*gpu, "--image-cuda", "13.0"): (
            "launch: no AMI runs this image's CUDA 13.0 (driver 580+) on ml.g4dn.xlarge (T4): "
            "SageMaker offers al2-ami-sagemaker-batch-gpu-470 (driver 470), "
            "al2-ami-sagemaker-batch-gpu-535 (driver 535); use another instance type (a CPU type "
            "runs any build) or an image built for an older CUDA"
        ),
        (
            *gpu,
            "--image-cuda",
            "12.6",
            "--transform-ami-version",
            "al2-ami-sagemaker-batch-gpu-470",
        ): (
            "launch: --transform-ami-version: al2-ami-sagemaker-batch-gpu-470 has driver 470 "
            "(CUDA 11.4), which cannot run this image's CUDA 12.6 on ml.g4dn.xlarge: use "
            "al2-ami-sagemaker-batch-gpu-535 (driver 535)"
        ),
        ("--transform-ami-version", "al2-ami-sagemaker-batch-gpu-535"): (
            "launch: ml.m5.xlarge has no NVIDIA GPU: drop --transform-ami-version "
            "al2-ami-sagemaker-batch-gpu-535 (GPU AMIs are for GPU instance types)"
        ),
    }
    for flags, message in cases.items():
        done = launch("transform", "--model-data", MODEL_DATA, "--no-wait", *flags)
        assert one_line_error(done) == message
    sagemaker = launch.client("sagemaker")
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_transform_jobs()["TransformJobSummaries"] == []


def test_a_model_name_or_model_data_is_needed(launch: Launch) -> None:
    done = launch("transform", "--no-wait", "--bucket", BUCKET)
    assert one_line_error(done).startswith("launch: no model: pass --model")


def test_concurrency_times_payload_stays_within_100(launch: Launch) -> None:
    done = launch("transform", "--model", "m", "--max-concurrent-transforms", "17", "--no-wait")
    assert one_line_error(done).endswith("so 1 to 16")


@pytest.fixture
def outputs(launch: Launch, server: Server, dataset: Path) -> dict[str, bytes]:
    """The test channel in s3://BUCKET/in/ and, in s3://BUCKET/out/, the .out body the real
    server answers for each image, as batch transform writes them; one image has no output, and
    every third abstains (asked with min_confidence=1)."""
    s3 = launch.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    bodies = {}
    images = sorted(p for p in (dataset / "test").rglob("*") if p.is_file())
    for n, image in enumerate(images):
        relative = image.relative_to(dataset / "test").as_posix()
        s3.put_object(Bucket=BUCKET, Key=f"in/{relative}", Body=image.read_bytes())
        strict = {"X_Amzn_SageMaker_Custom_Attributes": "min_confidence=1"} if n % 3 == 1 else {}
        answer = server.post(image.read_bytes(), "image/jpeg", Accept="application/json", **strict)
        assert answer.status_code == 200
        bodies[relative] = answer.content
    del bodies[images[0].relative_to(dataset / "test").as_posix()]  # as if it failed
    for relative, body in bodies.items():
        s3.put_object(Bucket=BUCKET, Key=f"out/{relative}.out", Body=body)
    return bodies


def test_fetch_scores_the_server_outputs(
    launch: Launch, outputs: dict[str, bytes], tmp_path: Path
) -> None:
    started = launch.ok(
        "transform",
        "--model", "dog-classifier-model",
        "--input", f"s3://{BUCKET}/in/",
        "--output", f"s3://{BUCKET}/out/",
        "--no-wait",
        "--bucket", BUCKET,
    )  # fmt: skip
    job = _job(started.stdout)
    local = tmp_path / "fetched"
    done = launch.ok("transform", "--fetch-only", job, "--download", str(local), "--bucket", BUCKET)

    for relative, body in outputs.items():
        assert (local / f"{relative}.out").read_bytes() == body
    assert f"{len(outputs)} outputs in {local}/ ({len(outputs) + 1} inputs in" in done.stdout
    assert "1 inputs have no output (failed or not sent): 001.Affenpinscher/" in done.stdout

    expected: dict[str, list[int]] = {}
    for relative, body in outputs.items():
        truth = class_name(relative.split("/")[0])
        answer = json.loads(body)
        right = answer["predictions"][0]["label"] == truth
        counts = expected.setdefault(truth, [0, 0, 0, 0])  # images, correct, answered, right
        counts[0] += 1
        counts[1] += right
        counts[2] += not answer["abstained"]
        counts[3] += right and not answer["abstained"]
    expected["all"] = [sum(c[i] for c in expected.values()) for i in range(4)]
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("class "))
    rows = {" ".join(line.split()[:-6]): line.split()[-6:] for line in lines[start + 1 :]}
    assert set(rows) == set(expected)
    for truth, (n, k, a, r) in expected.items():
        assert rows[truth] == [
            str(n),
            str(k),
            f"{k / n:.1%}",
            str(a),
            f"{a / n:.1%}",
            f"{r / a:.1%}",
        ]
    assert 0 < expected["all"][2] < expected["all"][0]  # some answered, some abstained
    assert f"{expected['all'][0] - expected['all'][2]} images abstained" in done.stdout
