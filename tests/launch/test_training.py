"""`launch train` against moto: what CreateTrainingJob carries (read back, and as sent), and what
`--debugger` does when CreateTrainingJob refuses Debugger (a stand-in for SageMaker in front of
moto that refuses it)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import pytest
import sagemaker.config
import sagemaker.utils

from container.training.metrics import METRIC_DEFINITIONS
from launch.errors import explain, job_ended
from tests.conftest import SAGEMAKER_SDK_CONFIG
from tests.launch.conftest import Launch, StandInHandler, one_line_error, stand_in


def training_job(stdout: str) -> str:
    """The name of the job `launch train` started: its first line is `training job NAME`."""
    return stdout.splitlines()[0].removeprefix("training job ")


def test_train_sends_debugger_rules_profiler_spot_and_fastfile(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    values = tmp_path / "hp.json"
    values.write_text(json.dumps({"epochs": "4", "lr": "0.0123", "batch_size": 16}))
    done = launch.ok(
        "train", "--bucket", bucket, "--no-wait", "--hyperparameters", str(values),
        "--set", "optimizer=adamw", "--spot", "--max-run", "3600", "--max-wait", "7200",
        "--instance-count", "2", "--save-interval", "5", "--profiler-interval", "1000",
    )  # fmt: skip
    name = training_job(done.stdout)
    assert name.startswith("dog-classifier-train-")
    assert f"#/jobs/{name}" in done.stdout
    job = launch.client("sagemaker").describe_training_job(TrainingJobName=name)

    assert job["HyperParameters"] == {
        "epochs": "4", "lr": "0.0123", "batch_size": "16", "optimizer": "adamw"
    }  # fmt: skip
    assert job["ResourceConfig"]["InstanceCount"] == 2
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "FastFile"
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert sorted(channels) == ["test", "train", "valid"]
    for channel in ("train", "valid", "test"):
        assert channels[channel]["InputMode"] == "FastFile"
        source = channels[channel]["DataSource"]["S3DataSource"]["S3Uri"]
        assert source == f"s3://{bucket}/dog-classifier/data/{channel}/"
    assert job["OutputDataConfig"]["S3OutputPath"] == f"s3://{bucket}/dog-classifier/output"

    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 3600, "MaxWaitTimeInSeconds": 7200}
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{bucket}/dog-classifier/checkpoints"

    hook = job["DebugHookConfig"]
    assert hook["S3OutputPath"] == f"s3://{bucket}/dog-classifier/debug"
    assert hook["HookParameters"] == {"save_interval": "5"}
    collections = {
        c["CollectionName"]: c["CollectionParameters"] for c in hook["CollectionConfigurations"]
    }
    assert collections == {
        "losses": {"save_interval": "1"},
        "gradients": {"save_interval": "5"},
        "weights": {"save_interval": "5"},
        "biases": {"save_interval": "5"},
        # poor_weight_initialization's own collection, at our interval rather than its 500
        "relu_input": {"include_regex": ".*relu_input", "save_interval": "5"},
    }
    rules = {r["RuleConfigurationName"]: r for r in job["DebugRuleConfigurations"]}
    assert set(rules) >= {
        "LossNotDecreasing", "VanishingGradient", "Overfit", "Overtraining",
        "PoorWeightInitialization",
    }  # fmt: skip
    assert all("sagemaker-debugger-rules" in r["RuleEvaluatorImage"] for r in rules.values())

    # What moto does not keep: the request itself.
    (request,) = launch.sent("SageMaker.CreateTrainingJob")
    assert request["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert request["ProfilerConfig"] == {
        "S3OutputPath": f"s3://{bucket}/dog-classifier/profiler",
        "ProfilingIntervalInMilliseconds": 1000,
        "DisableProfiler": False,
    }
    assert request["DebugRuleConfigurations"] == job["DebugRuleConfigurations"]


def test_an_unknown_channel_is_sent_only_when_given(launch: Launch, bucket: str) -> None:
    uri = f"s3://{bucket}/elsewhere/unknown/"
    done = launch.ok("train", "--bucket", bucket, "--no-wait", "--unknown", uri)
    job = launch.client("sagemaker").describe_training_job(
        TrainingJobName=training_job(done.stdout)
    )
    channels = {c["ChannelName"]: c for c in job["InputDataConfig"]}
    assert sorted(channels) == ["test", "train", "unknown", "valid"]
    assert channels["unknown"]["DataSource"]["S3DataSource"]["S3Uri"] == uri
    assert channels["unknown"]["InputMode"] == "FastFile"


def test_train_waits_then_prints_model_and_final_metrics(launch: Launch, bucket: str) -> None:
    """moto completes a job at once, with one made-up final metric."""
    done = launch.ok("train", "--bucket", bucket, "--no-logs", "--debugger", "off")
    name = training_job(done.stdout)
    model = f"s3://{bucket}/dog-classifier/output/{name}/output/model.tar.gz"
    assert f"model: {model}" in done.stdout
    assert "train:progress = 100" in done.stdout
    job = launch.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert "DebugHookConfig" not in job
    assert "EnableManagedSpotTraining" not in job or not job["EnableManagedSpotTraining"]
    (request,) = launch.sent("SageMaker.CreateTrainingJob")
    assert "DebugRuleConfigurations" not in request


def test_checkpoints_without_spot(launch: Launch, bucket: str) -> None:
    done = launch.ok(
        "train", "--bucket", bucket, "--no-wait", "--checkpoint-s3-uri", f"s3://{bucket}/ck",
        "--input-mode", "File",
    )  # fmt: skip
    job = launch.client("sagemaker").describe_training_job(
        TrainingJobName=training_job(done.stdout)
    )
    assert job["CheckpointConfig"]["S3Uri"] == f"s3://{bucket}/ck"
    assert job["AlgorithmSpecification"]["TrainingInputMode"] == "File"


def test_unknown_or_bad_hyperparameter_is_one_line(launch: Launch, bucket: str) -> None:
    line = one_line_error(launch("train", "--bucket", bucket, "--set", "epoch=3"))
    assert line.startswith("launch: unknown hyperparameter(s) epoch: the image knows arch,")
    line = one_line_error(launch("train", "--bucket", bucket, "--set", "epochs=zero"))
    assert "epochs='zero'" in line


def test_no_role_is_one_line_naming_the_flag(launch: Launch, bucket: str) -> None:
    launch.common = ["--image-uri", launch.common[3]]
    line = one_line_error(launch("train", "--bucket", bucket))
    assert line == "launch: no role given: pass --role, or set role in launch.toml"


def test_no_region_is_one_line(launch: Launch, bucket: str) -> None:
    env = {k: v for k, v in launch.env.items() if k != "AWS_DEFAULT_REGION"}
    launch.env = env
    line = one_line_error(launch("train", "--bucket", bucket, "--no-wait"))
    assert line.startswith("launch: no AWS region: pass --region")


def test_a_failed_job_is_one_line_with_its_reason() -> None:
    """What `train` raises for the SDK's UnexpectedStatusException (moto never fails a job)."""
    error = job_ended("training", "dog-train-1", "Failed", "AlgorithmError: CUDA out of\nmemory")
    assert (
        explain(error)
        == "training job dog-train-1 ended Failed: AlgorithmError: CUDA out of memory"
    )
    assert (
        str(job_ended("tuning", "t", "Stopped", None))
        == "tuning job t ended Stopped: no FailureReason given"
    )


# --- --debugger, and a CreateTrainingJob that refuses Debugger ---------------------------------

REFUSAL = (
    "DebugHookConfig is not supported for this account: Amazon SageMaker Debugger is no longer "
    "open to new customers."
)
"""AWS publishes no wording for this refusal; this one is shaped like the one it gives where a
region lacks the feature ("ProfilerConfig is currently not supported in cn-northwest-1",
aws/sagemaker-python-sdk#2134), with the docs' own sentence."""


@dataclass
class RefusingSageMaker:
    """A stand-in for the SageMaker API in front of moto_server: CreateTrainingJob requests that
    carry DebugHookConfig get SageMaker's JSON ValidationException (and are kept in `refused`),
    every other request goes on to moto. `launch` is aimed at it with AWS_ENDPOINT_URL_SAGEMAKER,
    so S3 and the rest still reach moto directly."""

    refused: list[dict[str, Any]] = field(default_factory=list)


@pytest.fixture
def refusing(launch: Launch) -> Iterator[RefusingSageMaker]:
    moto = launch.env["AWS_ENDPOINT_URL"]
    refusals = RefusingSageMaker()

    class Refuse(StandInHandler):
        def post(self, body: bytes) -> None:  # the SageMaker API is JSON over POST
            target = self.headers["X-Amz-Target"]
            if target == "SageMaker.CreateTrainingJob" and "DebugHookConfig" in json.loads(body):
                refusals.refused.append(json.loads(body))
                refusal = {"__type": "ValidationException", "message": REFUSAL}
                self.answer(400, "application/x-amz-json-1.1", json.dumps(refusal).encode())
            else:
                self.forward(moto, body)

    with stand_in(Refuse) as url:
        launch.env["AWS_ENDPOINT_URL_SAGEMAKER"] = url
        yield refusals


def test_the_sdk_config_file_still_sets_defaults_and_is_still_validated(
    launch: Launch, bucket: str, tmp_path: Path
) -> None:
    """launch checks the SDK's config schema once (launch/aws.py), not on every validation: the
    file's defaults still reach the job, a config the schema refuses gets the SDK's error, and a
    config file the schema refuses stops the command with one line that says where."""
    config = tmp_path / "sdk-config.yaml"
    tags = "  TrainingJob:\n    Tags:\n      - Key: team\n        Value: vision\n"
    config.write_text(SAGEMAKER_SDK_CONFIG + tags)
    env = {"SAGEMAKER_USER_CONFIG_OVERRIDE": str(config)}
    launch.ok("train", "--bucket", bucket, "--no-wait", env=env)
    (request,) = launch.sent("SageMaker.CreateTrainingJob")
    assert {"Key": "team", "Value": "vision"} in request["Tags"]

    refused = {"SchemaVersion": "1.0", "SageMaker": {"TrainingJob": {"Tags": [{"Key": 1}]}}}
    with pytest.raises(jsonschema.ValidationError) as sdk:
        sagemaker.config.validate_sagemaker_config(refused)
    with pytest.raises(jsonschema.ValidationError) as ours:
        sagemaker.utils.validate_sagemaker_config(refused)  # launch's, once launch.aws is loaded
    assert ours.value.message == sdk.value.message
    assert list(ours.value.absolute_path) == list(sdk.value.absolute_path)
    config.write_text(SAGEMAKER_SDK_CONFIG + "  TrainingJob:\n    Tags:\n      - Key: 1\n")
    assert one_line_error(launch("train", "--bucket", bucket, "--no-wait", env=env)) == (
        "launch: a SageMaker SDK config file breaks the SDK's schema at "
        "SageMaker.TrainingJob.Tags.0: 'Value' is a required property; fix it in the file "
        "SAGEMAKER_USER_CONFIG_OVERRIDE names, else ~/.config/sagemaker/config.yaml, or "
        "/etc/xdg/sagemaker/config.yaml (SAGEMAKER_ADMIN_CONFIG_OVERRIDE)"
    )


def _train(launch: Launch, bucket: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """`launch train --bucket BUCKET --no-wait FLAGS...`: never a traceback, nor the SDK's pointer
    to its troubleshooting guide (the retry line or the error says more)."""
    done = launch("train", "--bucket", bucket, "--no-wait", *flags)
    assert "Traceback" not in done.stderr
    assert "troubleshooting guide" not in done.stderr
    return done


RETRY = (
    f"CreateTrainingJob refused Debugger (ValidationException: {REFUSAL}): starting {{}} again "
    "without it; the job records its own tensors (save_tensors=true) for launch report"
)


def test_auto_starts_the_job_again_without_debugger_when_refused(
    launch: Launch, bucket: str, refusing: RefusingSageMaker
) -> None:
    done = _train(launch, bucket, "--set", "epochs=2")
    assert done.returncode == 0, done.stderr
    name = training_job(done.stdout)
    assert RETRY.format(name) in done.stdout.splitlines()
    (first,) = refusing.refused
    assert first["TrainingJobName"] == name
    assert {"DebugHookConfig", "DebugRuleConfigurations"} <= set(first)
    assert first["ProfilerConfig"]["DisableProfiler"] is False
    (request,) = launch.sent("SageMaker.CreateTrainingJob")  # what reached "SageMaker"
    assert request["TrainingJobName"] == name
    assert "DebugHookConfig" not in request
    assert "DebugRuleConfigurations" not in request
    assert "ProfilerRuleConfigurations" not in request
    # The SDK's way to say "no profiler", as it sends in regions without one (fw_utils).
    assert request.get("ProfilerConfig", {"DisableProfiler": True}) == {"DisableProfiler": True}
    assert request["HyperParameters"] == {"epochs": "2", "save_tensors": "true"}
    job = launch.client("sagemaker").describe_training_job(TrainingJobName=name)
    assert job["HyperParameters"]["save_tensors"] == "true"


def test_service_fails_in_one_line_when_refused(
    launch: Launch, bucket: str, refusing: RefusingSageMaker
) -> None:
    done = _train(launch, bucket, "--debugger", "service")
    assert done.returncode == 1, done.stderr
    # Above it, the SDK's own progress lines (INFO), as for every job launch starts.
    assert done.stderr.splitlines()[-1] == (
        f"launch: --debugger service: CreateTrainingJob refused Debugger (ValidationException: "
        f"{REFUSAL}); Debugger is closed to accounts new since 2026-07-30: use --debugger auto "
        "(the job evaluates the rules itself) or off"
    )
    assert len(refusing.refused) == 1
    assert launch.sent("SageMaker.CreateTrainingJob") == []


@pytest.mark.parametrize("flag", [("--debugger", "off"), ("--no-debugger",)])
def test_off_sends_no_debugger_and_no_tensor_recording(
    launch: Launch, bucket: str, refusing: RefusingSageMaker, flag: tuple[str, ...]
) -> None:
    """`--no-debugger`, the flag's old name, is kept as a hidden alias of `--debugger off`."""
    done = _train(launch, bucket, *flag)
    assert done.returncode == 0, done.stderr
    assert "refused" not in done.stdout
    assert refusing.refused == []
    (request,) = launch.sent("SageMaker.CreateTrainingJob")
    assert not {"DebugHookConfig", "DebugRuleConfigurations"} & set(request)
    assert request.get("ProfilerConfig", {"DisableProfiler": True}) == {"DisableProfiler": True}
    assert "HyperParameters" not in request or "save_tensors" not in request["HyperParameters"]


def test_auto_without_debugger_in_the_region_goes_straight_to_the_job_s_own(
    launch: Launch, bucket: str
) -> None:
    """The SDK knows the regions without Debugger (sagemaker.fw_utils) and raises a bare
    ValueError for a hook config there; auto does not ask, service says so in one line."""
    done = launch.ok("train", "--bucket", bucket, "--no-wait", "--region", "ap-southeast-3")
    assert (
        "SageMaker Debugger is not offered in ap-southeast-3: the job records its own tensors "
        "(save_tensors=true) for launch report"
    ) in done.stdout.splitlines()
    (request,) = launch.sent("SageMaker.CreateTrainingJob")
    assert "DebugHookConfig" not in request
    assert request["HyperParameters"] == {"save_tensors": "true"}
    line = one_line_error(
        launch("train", "--bucket", bucket, "--region", "ap-southeast-3", "--debugger", "service")
    )
    assert line == (
        "launch: --debugger service: SageMaker Debugger is not offered in ap-southeast-3; use "
        "--debugger auto or off"
    )
