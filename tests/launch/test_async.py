"""Asynchronous endpoints against moto: `deploy --async` (its config, environment, backlog
autoscaling and wake-up alarm), `invoke --async` and `cleanup`.

moto's InvokeEndpointAsync answers at once: it writes the next result queued through
/moto-api/static/sagemaker/async-endpoint-results (or a default) into a bucket of its own and
returns its location, without reading the input. The waiting is tested against a stand-in for
SageMaker Runtime that answers as SageMaker does, with locations under the test's bucket, where the
test puts the answer later, or never.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import httpx

from launch.invoke import format_answer
from tests.launch.conftest import Launch, StandInHandler, one_line_error, stand_in
from tests.launch.test_hosting import MODEL_DATA, artifact

ASYNC = "s3://launch-bucket/dog-classifier/async"
TOPICS = (
    "arn:aws:sns:us-east-1:123456789012:dogs-ok",
    "arn:aws:sns:us-east-1:123456789012:dogs-no",
)
ANSWER = {
    "predictions": [
        {"label": "Afghan hound", "index": 1, "probability": 0.9869},
        {"label": "Affenpinscher", "index": 0, "probability": 0.0101},
    ],
    "abstained": False,
    "model_version": "resnet18-4ce747b679e4",
}


def _deploy_async(launch: Launch, *flags: str) -> str:
    """`deploy --async` on a CPU type, the project's bucket `launch-bucket`; the endpoint."""
    done = launch.ok(
        "deploy", "--model-data", artifact(launch), "--async", "--instance-type", "ml.c5.xlarge",
        "--bucket", "launch-bucket", *flags,
    )  # fmt: skip
    found = re.search(r"^endpoint: (\S+)", done.stdout, re.MULTILINE)
    assert found, done.stdout
    return found.group(1)


def _images(folder: Path, *names: str) -> list[Path]:
    """Files that start as a JPEG does (nothing here decodes them)."""
    paths = []
    for name in names:
        path = folder / name
        path.write_bytes(b"\xff\xd8 " + name.encode())
        paths.append(path)
    return paths


def test_deploy_async_with_scaling_to_zero(launch: Launch, bucket: str) -> None:
    endpoint = _deploy_async(
        launch, "--endpoint-name", "dogs-async", "--sns-success-topic", TOPICS[0],
        "--sns-error-topic", TOPICS[1], "--max-concurrent-invocations", "4",
        "--autoscale", "0:3", "--target-backlog", "2",
    )  # fmt: skip
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    expected = {
        "OutputConfig": {
            "S3OutputPath": f"{ASYNC}/output",
            "S3FailurePath": f"{ASYNC}/failure",
            "NotificationConfig": {"SuccessTopic": TOPICS[0], "ErrorTopic": TOPICS[1]},
        },
        "ClientConfig": {"MaxConcurrentInvocationsPerInstance": 4},
    }
    assert request["AsyncInferenceConfig"] == expected
    sagemaker = launch.client("sagemaker")
    config = sagemaker.describe_endpoint_config(EndpointConfigName=endpoint)
    assert config["AsyncInferenceConfig"] == expected
    model = sagemaker.describe_model(ModelName=config["ProductionVariants"][0]["ModelName"])
    assert model["PrimaryContainer"]["Environment"] == {
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "1024",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "3600",
    }

    scaling = launch.client("application-autoscaling")
    resource = "endpoint/dogs-async/variant/AllTraffic"
    (target,) = scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"]
    assert (target["ResourceId"], target["MinCapacity"], target["MaxCapacity"]) == (resource, 0, 3)
    policies = {
        p["PolicyType"]: p
        for p in scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    }
    assert set(policies) == {"TargetTrackingScaling", "StepScaling"}
    tracking = policies["TargetTrackingScaling"]["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 2
    assert tracking["CustomizedMetricSpecification"] == {
        "MetricName": "ApproximateBacklogSizePerInstance",
        "Namespace": "AWS/SageMaker",
        "Dimensions": [{"Name": "EndpointName", "Value": "dogs-async"}],
        "Statistic": "Average",
    }
    step = policies["StepScaling"]
    assert step["ResourceId"] == resource
    assert step["StepScalingPolicyConfiguration"]["StepAdjustments"] == [
        {"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}
    ]
    (alarm,) = launch.client("cloudwatch").describe_alarms()["MetricAlarms"]
    assert alarm["MetricName"] == "HasBacklogWithoutCapacity"
    assert alarm["Namespace"] == "AWS/SageMaker"
    assert alarm["Dimensions"] == [{"Name": "EndpointName", "Value": "dogs-async"}]
    assert alarm["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarm["Threshold"] == 1
    assert alarm["AlarmActions"] == [step["PolicyARN"]]


def test_deploy_async_with_its_own_paths_and_limits(launch: Launch, bucket: str) -> None:
    done = launch.ok(
        "deploy", "--model-data", artifact(launch), "--async", "--instance-type", "ml.c5.xlarge",
        "--async-output", "s3://results/dogs", "--async-failure", "s3://results/dogs-failed",
        "--max-payload-mb", "200", "--model-server-timeout", "900", "--autoscale", "1:2",
        "--env", "SERVE_MAX_BATCH_SIZE=8",
    )  # fmt: skip
    assert "async:    results to s3://results/dogs, failures to s3://results/dogs-failed" in (
        done.stdout
    )
    assert "launch invoke --async IMAGES --endpoint " in done.stdout
    (request,) = launch.sent("SageMaker.CreateEndpointConfig")
    assert request["AsyncInferenceConfig"] == {
        "OutputConfig": {
            "S3OutputPath": "s3://results/dogs",
            "S3FailurePath": "s3://results/dogs-failed",
        }
    }
    (model,) = launch.sent("SageMaker.CreateModel")
    assert model["PrimaryContainer"]["Environment"] == {
        "SERVE_MAX_BATCH_SIZE": "8",
        "SAGEMAKER_MAX_PAYLOAD_IN_MB": "200",
        "SAGEMAKER_MODEL_SERVER_TIMEOUT": "900",
    }
    # At least one instance always: nothing to wake from zero.
    scaling = launch.client("application-autoscaling")
    (policy,) = scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"]
    assert policy["PolicyType"] == "TargetTrackingScaling"
    assert launch.client("cloudwatch").describe_alarms()["MetricAlarms"] == []


def test_async_mistakes_are_one_line_and_create_nothing(launch: Launch) -> None:
    artifact(launch)
    cases = {
        ("--async", "--max-payload-mb", "2000"): "--max-payload-mb 2000: use 1 to 1024",
        ("--async", "--model-server-timeout", "7200"): "--model-server-timeout 7200: use 1 to",
        ("--async", "--sns-error-topic", "dogs"): "give an SNS topic ARN",
        ("--async", "--async-output", "results/dogs"): "--async-output 'results/dogs'",
        ("--async", "--env", "SAGEMAKER_MAX_PAYLOAD_IN_MB=5"): "set it with --max-payload-mb",
        ("--async", "--serverless"): "--serverless and --async: pick one kind of endpoint",
        ("--autoscale", "0:2"): "(MIN 0, scaling to zero, is for --async endpoints)",
        ("--async", "--autoscale", "0:0"): "MAX at least 1",
    }
    for flags, message in cases.items():
        assert message in one_line_error(launch("deploy", "--model-data", MODEL_DATA, *flags))
    assert launch.client("sagemaker").list_models()["Models"] == []


def _queue(launch: Launch, *results: dict[str, Any]) -> None:
    """The answers moto's InvokeEndpointAsync gives next, in order."""
    url = f"{launch.env['AWS_ENDPOINT_URL']}/moto-api/static/sagemaker/async-endpoint-results"
    httpx.post(url, json={"results": list(results)}).raise_for_status()


def test_invoke_async_through_moto(launch: Launch, bucket: str, tmp_path: Path) -> None:
    many = {
        "results": [
            {"image": "a.jpg", **{k: v for k, v in ANSWER.items() if k != "model_version"}},
            {"image": "b.jpg", "error": "bad_request", "message": "b.jpg: not an image"},
        ],
        "model_version": ANSWER["model_version"],
    }
    _queue(launch, {"data": json.dumps(ANSWER)}, {"data": json.dumps(many)})
    dog, pair = _images(tmp_path, "dog.jpg", "pair.zip")  # a .zip of a.jpg and b.jpg
    done = launch(
        "invoke", "--async", str(dog), str(pair), "--endpoint", "dogs-async",
        "--bucket", "launch-bucket", "--invocation-timeout", "120", "--top-k", "2",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr  # one image of the second input failed
    assert format_answer(str(dog), ANSWER)[0] in done.stdout
    assert "     1  Afghan hound       1  0.9869" in done.stdout
    assert format_answer(str(pair), many)[0] in done.stdout
    assert f"{pair}: a.jpg  (model resnet18-4ce747b679e4)" in done.stdout
    assert f"{pair}: b.jpg: failed (bad_request): b.jpg: not an image" in done.stdout
    assert done.stdout.endswith("1 of 2 images failed\n")

    sent = launch.received("/endpoints/dogs-async/async-invocations")
    assert [h["x-amzn-sagemaker-content-type"] for h in sent] == ["image/jpeg", "application/zip"]
    assert {h["x-amzn-sagemaker-invocationtimeoutseconds"] for h in sent} == {"120"}
    assert {h["x-amzn-sagemaker-custom-attributes"] for h in sent} == {"top_k=2"}
    s3 = launch.client("s3")
    for headers, path in zip(sent, (dog, pair), strict=True):
        location = headers["x-amzn-sagemaker-inputlocation"]
        assert location.startswith(f"{ASYNC}/input/")
        assert location.endswith(f"/{path.name}")
        key = location.removeprefix("s3://launch-bucket/")
        assert s3.get_object(Bucket="launch-bucket", Key=key)["Body"].read() == path.read_bytes()


def test_invoke_async_prints_a_failure_through_moto(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    _queue(launch, {"is_failure": True, "data": '{"message": "Received server error (500)"}'})
    (dog,) = _images(tmp_path, "dog.jpg")
    done = launch("invoke", "--async", str(dog), "--endpoint", "dogs-async", "--bucket", bucket)
    assert done.returncode == 1
    assert f'{dog}: failed: {{"message": "Received server error (500)"}}' in done.stdout


def _runtime(answer: Callable[[str, str], None]) -> type[StandInHandler]:
    """A stand-in for SageMaker Runtime's InvokeEndpointAsync, answering as SageMaker does: 202,
    the output and failure locations under the endpoint's paths; `answer(output, failure)` is
    told them."""

    class AsyncRuntime(StandInHandler):
        seen: ClassVar[list[dict[str, str]]] = []

        def post(self, body: bytes) -> None:
            assert re.fullmatch(r"/endpoints/[^/]+/async-invocations", self.path), self.path
            self.seen.append(dict(self.headers))
            inference = str(uuid.uuid4())
            output = f"{ASYNC}/output/{inference}.out"
            failure = f"{ASYNC}/failure/{inference}-error.out"
            answer(output, failure)
            payload = json.dumps({"InferenceId": inference}).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("X-Amzn-SageMaker-OutputLocation", output)
            self.send_header("X-Amzn-SageMaker-FailureLocation", failure)
            self.end_headers()
            self.wfile.write(payload)

    return AsyncRuntime


def test_invoke_async_waits_for_a_late_answer(launch: Launch, bucket: str, tmp_path: Path) -> None:
    s3 = launch.client("s3")
    timers: list[threading.Timer] = []

    def later(output: str, failure: str) -> None:
        key = output.removeprefix("s3://launch-bucket/")
        body = json.dumps(ANSWER).encode()
        timer = threading.Timer(1.5, lambda: s3.put_object(Bucket=bucket, Key=key, Body=body))
        timer.start()
        timers.append(timer)

    (dog,) = _images(tmp_path, "dog.jpg")
    with stand_in(_runtime(later)) as url:
        done = launch(
            "invoke", "--async", str(dog), "--endpoint", "dogs-async", "--bucket", bucket,
            "--wait", "30", env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": url},
        )  # fmt: skip
    for timer in timers:
        timer.join()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == format_answer(str(dog), ANSWER)[0] + "\n"


def test_invoke_async_says_when_no_answer_came(launch: Launch, bucket: str, tmp_path: Path) -> None:
    (dog,) = _images(tmp_path, "dog.jpg")
    with stand_in(_runtime(lambda output, failure: None)) as url:
        done = launch(
            "invoke", "--async", str(dog), "--endpoint", "dogs-async", "--bucket", bucket,
            "--wait", "1", env={"AWS_ENDPOINT_URL_SAGEMAKER_RUNTIME": url},
        )  # fmt: skip
    assert done.returncode == 1
    (line, summary) = done.stdout.splitlines()
    assert line.startswith(f"{dog}: no answer within 1 s; it may still be queued or running ")
    assert f"it will be at {ASYNC}/output/" in line
    assert f", or a failure at {ASYNC}/failure/" in line
    assert summary == "1 of 1 images failed"


def test_invoke_async_mistakes_are_one_line(launch: Launch, tmp_path: Path) -> None:
    (dog,) = _images(tmp_path, "dog.jpg")
    cases = {
        ("--url", "http://127.0.0.1:9"): "--async needs --endpoint",
        ("--endpoint", "e", "--target-model", "v1.tar.gz"): "InvokeEndpointAsync takes no",
        ("--endpoint", "e", "--invocation-timeout", "0"): "--invocation-timeout 0: use 1 to 3600",
    }
    for flags, message in cases.items():
        assert message in one_line_error(launch("invoke", "--async", str(dog), *flags))


def test_cleanup_deletes_the_alarm_and_policies_and_keeps_the_results(
    launch: Launch, bucket: str
) -> None:
    endpoint = _deploy_async(launch, "--endpoint-name", "dogs-async", "--autoscale", "0:2")
    dry = launch.ok("cleanup", "--dry-run")
    assert "7 resource(s)" in dry.stdout  # alarm, 2 policies, target, endpoint, config, model
    listed = [line.split()[0] for line in dry.stdout.splitlines() if line.startswith("  ")]
    assert listed[:4] == ["alarm", "scaling-policy", "scaling-policy", "scaling-target"]
    assert re.search(rf"^  alarm +{endpoint}-HasBacklogWithoutCapacity$", dry.stdout, re.M)
    assert "S3 objects are not deleted" in dry.stdout
    assert f"  {ASYNC}/output (results of {endpoint})" in dry.stdout
    assert f"  {ASYNC}/failure (failures of {endpoint})" in dry.stdout

    done = launch.ok("cleanup", "--yes")
    deleted = [line for line in done.stdout.splitlines() if line.startswith("deleted ")]
    assert len(deleted) == 7
    assert launch.client("cloudwatch").describe_alarms()["MetricAlarms"] == []
    scaling = launch.client("application-autoscaling")
    assert scaling.describe_scaling_policies(ServiceNamespace="sagemaker")["ScalingPolicies"] == []
    assert scaling.describe_scalable_targets(ServiceNamespace="sagemaker")["ScalableTargets"] == []
    assert launch.client("sagemaker").list_endpoints()["Endpoints"] == []
