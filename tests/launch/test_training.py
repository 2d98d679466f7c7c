"""`launch train` against moto: what CreateTrainingJob carries (read back, and as sent)."""

from __future__ import annotations

import json
from pathlib import Path

from container.training.metrics import METRIC_DEFINITIONS
from launch.errors import explain, job_ended
from tests.launch.conftest import Launch, one_line_error


def _name(stdout: str) -> str:
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
    name = _name(done.stdout)
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


def test_train_waits_then_prints_model_and_final_metrics(launch: Launch, bucket: str) -> None:
    """moto completes a job at once, with one made-up final metric."""
    done = launch.ok("train", "--bucket", bucket, "--no-logs", "--no-debugger")
    name = _name(done.stdout)
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
    job = launch.client("sagemaker").describe_training_job(TrainingJobName=_name(done.stdout))
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
