"""Multi-model endpoints against moto: `deploy --multi-model`, `add-model`, `invoke --target-model`
and `cleanup` of what they made. moto cannot invoke an endpoint with a binary body, so the
requests go to stand-ins that record what they were sent."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, ClassVar

from tests.launch.conftest import IMAGE_URI, Launch, StandInHandler, one_line_error, stand_in
from tests.launch.test_hosting import MODEL_DATA, artifact, deploy

PREFIX = "s3://launch-bucket/dog-models/"
ANSWER = {
    "predictions": [{"label": "Afghan hound", "index": 1, "probability": 0.9869}],
    "abstained": False,
    "model_version": "resnet18-4ce747b679e4",
}


def _deploy_multi_model(launch: Launch, *flags: str) -> str:
    """`deploy --multi-model` on a CPU type into the bucket `launch-bucket`; the endpoint."""
    done = launch.ok(
        "deploy", "--multi-model", PREFIX.rstrip("/"), "--instance-type", "ml.c5.xlarge", *flags
    )
    found = re.search(r"^endpoint: (\S+)", done.stdout, re.MULTILINE)
    assert found, done.stdout
    return found.group(1)


def _object(launch: Launch, uri: str) -> bytes:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bytes(launch.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read())


def test_deploy_multi_model(launch: Launch, bucket: str) -> None:
    done = launch.ok(  # no --instance-type: a CPU one, as a multi-model endpoint needs
        "deploy", "--multi-model", PREFIX.rstrip("/"),
        "--endpoint-name", "dogs-mme", "--env", "SERVE_MAX_BATCH_SIZE=8", "--autoscale", "1:3",
    )  # fmt: skip
    assert f"no model under {PREFIX} yet: add one with launch add-model" in done.stderr
    assert "launch add-model model.tar.gz --endpoint dogs-mme" in done.stdout
    assert "launch invoke IMAGES --endpoint dogs-mme --target-model dogs-v1.tar.gz" in done.stdout

    (request,) = launch.sent("SageMaker.CreateModel")
    assert request["PrimaryContainer"] == {
        "Image": IMAGE_URI,
        "Mode": "MultiModel",
        "ModelDataUrl": PREFIX,
        "Environment": {"SERVE_MAX_BATCH_SIZE": "8", "SAGEMAKER_MULTI_MODEL": "true"},
    }
    sagemaker = launch.client("sagemaker")
    config = sagemaker.describe_endpoint_config(EndpointConfigName="dogs-mme")
    (variant,) = config["ProductionVariants"]
    assert variant["InstanceType"] == "ml.c5.xlarge"
    assert "InferenceAmiVersion" not in variant
    model = sagemaker.describe_model(ModelName=variant["ModelName"])
    assert model["PrimaryContainer"]["Mode"] == "MultiModel"
    assert model["PrimaryContainer"]["ModelDataUrl"] == PREFIX
    assert model["PrimaryContainer"]["Environment"]["SAGEMAKER_MULTI_MODEL"] == "true"
    tags = sagemaker.list_tags(ResourceArn=model["ModelArn"])["Tags"]
    assert {"Key": "created-by", "Value": "launch"} in tags
    scaling = launch.client("application-autoscaling")
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert target["ResourceId"] == "endpoint/dogs-mme/variant/AllTraffic"


def test_multi_model_mistakes_are_one_line_and_create_nothing(launch: Launch, bucket: str) -> None:
    artifact(launch)
    for instance_type in ("ml.g4dn.xlarge", "ml.p3.2xlarge", "ml.inf1.xlarge", "ml.trn1.2xlarge"):
        refused = one_line_error(
            launch("deploy", "--multi-model", PREFIX, "--instance-type", instance_type)
        )
        assert refused == (
            f"launch: --instance-type {instance_type}: a multi-model endpoint of a custom image "
            "runs on CPU instances only (AWS serves GPU multi-model endpoints only with its Triton "
            "container): pass a CPU type such as --instance-type ml.c5.xlarge"
        )
    cpu = ("--instance-type", "ml.c5.xlarge")
    cases = {
        ("--multi-model", "launch-bucket/models", *cpu): "give an S3 prefix",
        ("--multi-model", PREFIX, "--model-data", MODEL_DATA, *cpu): "launch add-model",
        ("--multi-model", PREFIX, "--async", *cpu): "--async and --multi-model: pick one",
        ("--multi-model", PREFIX, "--health-check-timeout", "600", *cpu): "MultiDataModel",
        ("--multi-model", "s3://no-such-bucket/models/", *cpu): "no bucket no-such-bucket",
    }
    for flags, message in cases.items():
        assert message in one_line_error(launch("deploy", *flags))
    sagemaker = launch.client("sagemaker")
    assert sagemaker.list_models()["Models"] == []
    assert sagemaker.list_endpoint_configs()["EndpointConfigs"] == []


def test_add_model_from_a_local_file_and_from_s3(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    local = tmp_path / "dogs-v1.tar.gz"
    local.write_bytes(b"a local model.tar.gz")
    done = launch.ok("add-model", str(local), "--model-data-prefix", PREFIX.rstrip("/"))
    assert f"added:        {local} -> {PREFIX}dogs-v1.tar.gz" in done.stdout
    assert "target model: dogs-v1.tar.gz" in done.stdout
    assert _object(launch, PREFIX + "dogs-v1.tar.gz") == b"a local model.tar.gz"

    source = artifact(launch)  # s3://artifacts/.../model.tar.gz
    done = launch.ok("add-model", source, "--model-data-prefix", PREFIX, "--name", "dogs-v2.tar.gz")
    assert "target model: dogs-v2.tar.gz" in done.stdout
    assert _object(launch, PREFIX + "dogs-v2.tar.gz") == _object(launch, source)

    again = one_line_error(launch("add-model", str(local), "--model-data-prefix", PREFIX))
    assert again.startswith(f"launch: {PREFIX}dogs-v1.tar.gz exists: ")
    assert "under a new --name" in again
    cases = {
        (str(local), "--model-data-prefix", PREFIX, "--name", "v3.zip"): "--name 'v3.zip': ",
        (str(tmp_path / "nothing.tar.gz"), "--model-data-prefix", PREFIX): "is not a file",
        ("s3://artifacts/none.tar.gz", "--model-data-prefix", PREFIX): "no object at s3://",
    }
    for args, message in cases.items():
        assert message in one_line_error(launch("add-model", *args))


def test_add_model_finds_the_prefix_of_an_endpoint(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    endpoint = _deploy_multi_model(launch, "--endpoint-name", "dogs-mme", "--no-wait")
    local = tmp_path / "dogs-v1.tar.gz"
    local.write_bytes(b"model one")
    done = launch.ok("add-model", str(local), "--endpoint", endpoint)
    assert _object(launch, PREFIX + "dogs-v1.tar.gz") == b"model one"
    assert (
        "invoke:       launch invoke IMAGES --endpoint dogs-mme --target-model dogs-v1.tar.gz"
    ) in done.stdout


def test_add_model_refuses_an_endpoint_of_one_model(launch: Launch, tmp_path: Path) -> None:
    deploy(launch, "--instance-type", "ml.c5.xlarge", "--endpoint-name", "dogs-one", "--no-wait")
    local = tmp_path / "dogs-v1.tar.gz"
    local.write_bytes(b"model one")
    refused = one_line_error(launch("add-model", str(local), "--endpoint", "dogs-one"))
    assert refused.startswith("launch: endpoint dogs-one serves one model (")
    assert "launch deploy --multi-model s3://BUCKET/PREFIX/" in refused
    missing = one_line_error(launch("add-model", str(local), "--endpoint", "nowhere"))
    assert missing.startswith("launch: no endpoint nowhere in us-east-1")


class _Recorder(StandInHandler):
    """Answers every POST with ANSWER, keeping each request's path and headers."""

    seen: ClassVar[list[tuple[str, dict[str, str]]]] = []

    def post(self, body: bytes) -> None:
        self.seen.append((self.path, dict(self.headers)))
        self.answer(200, "application/json", json.dumps(ANSWER).encode())


def test_invoke_target_model_reaches_the_container(launch: Launch, tmp_path: Path) -> None:
    image = tmp_path / "dog.jpg"
    image.write_bytes(b"\xff\xd8 a JPEG's start")
    _Recorder.seen.clear()
    with stand_in(_Recorder) as url:
        local = launch.ok("invoke", str(image), "--url", url, "--target-model", "dogs-v1.tar.gz")
        runtime = launch.ok(
            "invoke", str(image), "--endpoint", "dogs-mme", "--target-model", "dogs-v2.tar.gz",
            env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": url},
        )  # fmt: skip
    (to_url, url_headers), (to_runtime, runtime_headers) = _Recorder.seen
    assert to_url == "/invocations"
    assert url_headers["X-Amzn-SageMaker-Target-Model"] == "dogs-v1.tar.gz"
    # boto3 sends InvokeEndpoint's TargetModel as the same header; SageMaker passes it on.
    assert to_runtime == "/endpoints/dogs-mme/invocations"
    assert runtime_headers["X-Amzn-SageMaker-Target-Model"] == "dogs-v2.tar.gz"
    for done in (local, runtime):
        assert "     1  Afghan hound      1  0.9869" in done.stdout
    refused = one_line_error(launch("invoke", str(image), "--url", url, "--target-model", "v1"))
    assert refused.startswith("launch: --target-model 'v1': ")


def test_cleanup_deletes_a_multi_model_endpoint_and_keeps_its_models(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    endpoint = _deploy_multi_model(launch, "--endpoint-name", "dogs-mme")
    local = tmp_path / "dogs-v1.tar.gz"
    local.write_bytes(b"model one")
    launch.ok("add-model", str(local), "--endpoint", endpoint)
    done = launch.ok("cleanup", "--yes")
    model: Any = re.search(r"deleted model (\S+)", done.stdout)
    assert model, done.stdout
    assert "S3 objects are not deleted" in done.stdout
    assert f"  {PREFIX} (the models of {model.group(1)})" in done.stdout
    sagemaker = launch.client("sagemaker")
    assert sagemaker.list_endpoints()["Endpoints"] == []
    assert sagemaker.list_models()["Models"] == []
    assert _object(launch, PREFIX + "dogs-v1.tar.gz") == b"model one"
