"""`launch tune` against moto, and the leaderboard over responses shaped as the API returns them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from container.training.metrics import METRIC_DEFINITIONS
from launch.tuning import best_hyperparameters, format_leaderboard, leaderboard
from tests.launch.conftest import Launch, one_line_error
from tests.launch.test_training import training_job


def _name(stdout: str) -> str:
    return stdout.splitlines()[0].removeprefix("tuning job ")


def test_tune_sends_ranges_objective_metrics_and_limits(launch: Launch, bucket: str) -> None:
    done = launch.ok(
        "tune", "--bucket", bucket, "--no-wait", "--set", "epochs=6", "--set", "arch=resnet34",
        "--lr", "0.001", "0.05", "--batch-sizes", "16,32,64", "--frozen-epochs", "0", "3",
        "--max-jobs", "9", "--max-parallel-jobs", "3",
    )  # fmt: skip
    name = _name(done.stdout)
    assert name.startswith("dog-clas-tune-")
    assert len(name) <= 32
    assert f"#/hyper-tuning-jobs/{name}" in done.stdout
    job = launch.client("sagemaker").describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name
    )
    config = job["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Maximize",
        "MetricName": "val_acc",
    }
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 9, "MaxParallelTrainingJobs": 3}
    ranges = config["ParameterRanges"]
    continuous = {r["Name"]: r for r in ranges["ContinuousParameterRanges"]}
    assert continuous["lr"] == {
        "Name": "lr", "MinValue": "0.001", "MaxValue": "0.05", "ScalingType": "Logarithmic"
    }  # fmt: skip
    assert continuous["weight_decay"]["ScalingType"] == "Logarithmic"
    assert (continuous["weight_decay"]["MinValue"], continuous["weight_decay"]["MaxValue"]) == (
        "1e-05", "0.01"
    )  # fmt: skip
    assert ranges["CategoricalParameterRanges"] == [
        {"Name": "batch_size", "Values": ["16", "32", "64"]}
    ]
    assert ranges["IntegerParameterRanges"] == [
        {"Name": "frozen_epochs", "MinValue": "0", "MaxValue": "3", "ScalingType": "Linear"}
    ]

    definition = job["TrainingJobDefinition"]
    spec = definition["AlgorithmSpecification"]
    assert spec["MetricDefinitions"] == METRIC_DEFINITIONS  # given to the tuner, not inherited
    assert spec["TrainingImage"] == launch.common[3]
    assert spec["TrainingInputMode"] == "FastFile"
    # --debugger auto: a tuning job's jobs cannot have Debugger; each records its own tensors.
    assert definition["StaticHyperParameters"] == {
        "epochs": "6", "arch": "resnet34", "save_tensors": "true"
    }  # fmt: skip
    assert not {"DebugHookConfig", "DebugRuleConfigurations", "ProfilerConfig"} & set(definition)
    assert definition["HyperParameterTuningResourceConfig"]["InstanceType"] == "ml.g4dn.xlarge"
    assert definition["HyperParameterTuningResourceConfig"]["InstanceCount"] == 1
    sources = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in definition["InputDataConfig"]
    }
    assert sources == {
        c: f"s3://{bucket}/dog-classifier/data/{c}/" for c in ("train", "valid", "test")
    }
    assert definition["OutputDataConfig"]["S3OutputPath"] == f"s3://{bucket}/dog-classifier/output"


def test_hyperband_turns_early_stopping_off_and_sets_resources(launch: Launch, bucket: str) -> None:
    done = launch.ok(
        "tune", "--bucket", bucket, "--no-wait", "--strategy", "Hyperband", "--set", "epochs=8",
        "--min-resource", "2", "--train", "s3://elsewhere/train",
    )  # fmt: skip
    job = launch.client("sagemaker").describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=_name(done.stdout)
    )
    config = job["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Hyperband"
    assert config["TrainingJobEarlyStoppingType"] == "Off"
    assert config["StrategyConfig"] == {
        "HyperbandStrategyConfig": {"MinResource": 2, "MaxResource": 8}
    }
    sources = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in job["TrainingJobDefinition"]["InputDataConfig"]
    }
    assert sources["train"] == "s3://elsewhere/train"


def test_debugger_service_is_refused_and_off_records_no_tensors(
    launch: Launch, bucket: str
) -> None:
    line = one_line_error(launch("tune", "--bucket", bucket, "--debugger", "service"))
    assert line.startswith(
        "launch: --debugger service: a tuning job's training jobs cannot have SageMaker Debugger "
        "(HyperParameterTrainingJobDefinition has no DebugHookConfig): use --debugger auto"
    )
    done = launch.ok("tune", "--bucket", bucket, "--no-wait", "--debugger", "off")
    job = launch.client("sagemaker").describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=_name(done.stdout)
    )
    assert "save_tensors" not in job["TrainingJobDefinition"].get("StaticHyperParameters", {})


def test_tuned_names_cannot_be_static(launch: Launch, bucket: str) -> None:
    done = launch("tune", "--bucket", bucket, "--set", "lr=0.1")
    assert one_line_error(done).startswith("launch: lr are tuned: leave them out of the static")


def test_waiting_ends_with_what_moto_cannot_answer(launch: Launch, bucket: str) -> None:
    """moto completes a tuning job at once, cannot list its training jobs and answers a fixed
    placeholder BestTrainingJob: each is said in one line, and no best.json is written."""
    done = launch.ok("tune", "--bucket", bucket, "--set", "epochs=3")
    name = _name(done.stdout)
    assert f"tuning job {name}: Completed; training jobs: Completed 1" in done.stdout
    assert (
        "leaderboard unavailable: this endpoint does not answer "
        "ListTrainingJobsForHyperParameterTuningJob"
    ) in done.stdout
    assert "best hyperparameters not written: BestTrainingJob FakeTrainingJobName" in done.stdout
    assert not (launch.cwd / "best.json").exists()
    again = launch.ok("tune", "--leaderboard", name)
    assert "leaderboard unavailable" in again.stdout


# --- The leaderboard over real response shapes --------------------------------------------

T0 = datetime(2026, 11, 20, 10, 0, tzinfo=UTC)


def _summary(name: str, status: str, value: float | None, minutes: int, **tuned: str) -> Any:
    """One TrainingJobSummaries entry of ListTrainingJobsForHyperParameterTuningJob."""
    summary: dict[str, Any] = {
        "TrainingJobName": name,
        "TrainingJobArn": f"arn:aws:sagemaker:us-east-1:123456789012:training-job/{name}",
        "TuningJobName": "dog-tune-261120-100000",
        "CreationTime": T0,
        "TrainingStartTime": T0,
        "TrainingEndTime": T0 + timedelta(minutes=minutes),
        "TrainingJobStatus": status,
        "TunedHyperParameters": {"_tuning_objective_metric": "val_acc", **tuned},
        "ObjectiveStatus": "Succeeded" if value is not None else "Failed",
    }
    if value is not None:
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
            "Type": "Maximize", "MetricName": "val_acc", "Value": value
        }  # fmt: skip
    if status == "Failed":
        summary["FailureReason"] = "AlgorithmError: CUDA out of memory"
    return summary


SUMMARIES = [
    _summary("t-001-aaa", "Completed", 0.81, 12, lr="0.0031", batch_size="32", frozen_epochs="1",
             weight_decay="0.00012"),
    _summary("t-002-bbb", "Failed", None, 3, lr="0.09", batch_size="64", frozen_epochs="0",
             weight_decay="0.001"),
    _summary("t-003-ccc", "Stopped", 0.42, 5, lr="0.0002", batch_size="16", frozen_epochs="2",
             weight_decay="0.00003"),
    _summary("t-004-ddd", "Completed", 0.87, 14, lr="0.0113", batch_size="32", frozen_epochs="1",
             weight_decay="0.0004"),
]  # fmt: skip

DESCRIPTION: dict[str, Any] = {
    "HyperParameterTuningJobName": "dog-tune-261120-100000",
    "HyperParameterTuningJobStatus": "Completed",
    "HyperParameterTuningJobConfig": {
        "Strategy": "Bayesian",
        "HyperParameterTuningJobObjective": {"Type": "Maximize", "MetricName": "val_acc"},
        "ParameterRanges": {
            "IntegerParameterRanges": [
                {"Name": "frozen_epochs", "MinValue": "0", "MaxValue": "2", "ScalingType": "Linear"}
            ],
            "ContinuousParameterRanges": [
                {"Name": "lr", "MinValue": "0.0001", "MaxValue": "0.1",
                 "ScalingType": "Logarithmic"},
                {"Name": "weight_decay", "MinValue": "1e-05", "MaxValue": "0.01",
                 "ScalingType": "Logarithmic"},
            ],
            "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["16", "32", "64"]}],
        },
    },
    "TrainingJobDefinition": {
        "StaticHyperParameters": {
            "epochs": "6", "arch": "resnet18", "_tuning_objective_metric": "val_acc",
            "sagemaker_estimator_class_name": '"Estimator"',
        },
    },
    "BestTrainingJob": SUMMARIES[3],
}  # fmt: skip


def test_leaderboard_ranks_by_objective_and_times_each_job() -> None:
    trials = leaderboard(SUMMARIES)
    assert [t.name for t in trials] == ["t-004-ddd", "t-001-aaa", "t-003-ccc", "t-002-bbb"]
    assert [t.objective for t in trials] == [0.87, 0.81, 0.42, None]
    assert trials[0].seconds == 14 * 60
    assert trials[0].hyperparameters == {
        "lr": "0.0113", "batch_size": "32", "frozen_epochs": "1", "weight_decay": "0.0004"
    }  # fmt: skip
    assert trials[3].failure == "AlgorithmError: CUDA out of memory"
    table = format_leaderboard(trials, "val_acc").splitlines()
    assert table[0].split()[:5] == ["#", "training", "job", "status", "val_acc"]
    assert table[1].split()[:5] == ["1", "t-004-ddd", "Completed", "0.8700", "14.0"]
    assert "batch_size=32 frozen_epochs=1 lr=0.0113 weight_decay=0.0004" in table[1]
    assert table[4].split()[:5] == ["4", "t-002-bbb", "Failed", "-", "3.0"]
    assert table[4].endswith("(AlgorithmError: CUDA out of memory)")
    assert leaderboard(SUMMARIES, maximize=False)[0].name == "t-003-ccc"


def test_best_hyperparameters_are_static_plus_tuned_without_internals() -> None:
    best = best_hyperparameters(DESCRIPTION, leaderboard(SUMMARIES))
    assert best == {
        "epochs": "6", "arch": "resnet18",
        "lr": "0.0113", "batch_size": "32", "frozen_epochs": "1", "weight_decay": "0.0004",
    }  # fmt: skip
    # Without BestTrainingJob (still running), the best ranked trial.
    running = {k: v for k, v in DESCRIPTION.items() if k != "BestTrainingJob"}
    assert best_hyperparameters(running, leaderboard(SUMMARIES[:3]))["lr"] == "0.0031"  # type: ignore[index]
    assert best_hyperparameters(running, leaderboard([SUMMARIES[1]])) is None
    # moto's placeholder names a hyperparameter the job does not tune.
    placeholder = {**DESCRIPTION, "BestTrainingJob": {"TrainingJobName": "Fake",
                   "TunedHyperParameters": {"string": "TunedHyperParameters"}}}  # fmt: skip
    with pytest.raises(ValueError, match="has tuned values for string"):
        best_hyperparameters(placeholder)


def test_train_accepts_the_best_json(launch: Launch, bucket: str, tmp_path: Path) -> None:
    """What --best-out writes is what `launch train --hyperparameters` sends, value for value."""
    best = best_hyperparameters(DESCRIPTION)
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    done = launch.ok("train", "--bucket", bucket, "--no-wait", "--hyperparameters", str(path))
    job = launch.client("sagemaker").describe_training_job(
        TrainingJobName=training_job(done.stdout)
    )
    assert job["HyperParameters"] == best
