"""`launch tune`: a hyperparameter tuning job over the image, maximising `val_acc`.

The SDK v2 `HyperparameterTuner` does not inherit the estimator's metric definitions, so they are
given to both (docs/sagemaker-contract.md §4.1). When the job ends (or with `--leaderboard NAME`),
every training job is ranked by the objective, and the best one's hyperparameters are written as
JSON that `launch train --hyperparameters` takes back.

Its training jobs cannot have SageMaker Debugger (the API's HyperParameterTrainingJobDefinition has
no DebugHookConfig, rules or ProfilerConfig): each job evaluates the rules itself and, by default,
records its own tensors (hyperparameter save_tensors) for `launch report`.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from sagemaker.parameter import CategoricalParameter, ContinuousParameter, IntegerParameter
from sagemaker.tuner import HyperbandStrategyConfig, HyperparameterTuner, StrategyConfig

from container.training.hyperparameters import Hyperparameters
from container.training.metrics import OBJECTIVE_METRIC
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError, job_ended
from launch.settings import Common
from launch.training import (
    DEBUGGER_CHOICES,
    add_estimator_arguments,
    channels,
    estimator,
    hyperparameters,
    metric_definitions,
)

__all__ = ["HELP", "Trial", "add_arguments", "best_hyperparameters", "leaderboard", "run"]

logger = logging.getLogger(__name__)

HELP = "Tune lr, batch size, frozen epochs and weight decay for the best val_acc."

TUNED = ("lr", "batch_size", "frozen_epochs", "weight_decay")
"""The hyperparameters the tuner searches; the rest are static."""

# Keys the SDK and the tuner add for their own use, not the user's
# (docs/sagemaker-contract.md §2.3).
_INTERNAL_PREFIX = "sagemaker_"
_INTERNAL_KEYS = frozenset({"_tuning_objective_metric"})


def _pair(kind: type[float] | type[int]) -> dict[str, Any]:
    return {"nargs": 2, "type": kind, "metavar": ("MIN", "MAX")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_estimator_arguments(parser)
    ranges = parser.add_argument_group(
        "search space (static hyperparameters: --set/--hyperparameters)"
    )
    ranges.add_argument("--lr", **_pair(float), default=[1e-4, 1e-1], help="log scale")
    ranges.add_argument(
        "--batch-sizes", default="16,32,64", help="categorical, comma-separated (%(default)s)"
    )
    ranges.add_argument("--frozen-epochs", **_pair(int), default=[0, 2], help="integer")
    ranges.add_argument("--weight-decay", **_pair(float), default=[1e-5, 1e-2], help="log scale")
    parser.add_argument(
        "--strategy", default="Bayesian", choices=("Bayesian", "Random", "Hyperband")
    )
    parser.add_argument(
        "--debugger",
        default="auto",
        choices=DEBUGGER_CHOICES,
        help="a tuning job's training jobs cannot have SageMaker Debugger (the API's "
        "HyperParameterTrainingJobDefinition has no hook, rules or profiler), so service is "
        "refused; auto: each job records its own tensors (save_tensors=true) for launch report; "
        "off: not. Each job evaluates the rules itself either way (default: %(default)s)",
    )
    parser.add_argument("--max-jobs", type=int, default=12, help="%(default)s")
    parser.add_argument("--max-parallel-jobs", type=int, default=2, help="%(default)s")
    parser.add_argument(
        "--early-stopping",
        default="Auto",
        choices=("Auto", "Off"),
        help="stop jobs worse than the median at the same epoch (forced Off for Hyperband)",
    )
    parser.add_argument(
        "--min-resource", type=int, default=1, help="Hyperband: fewest epochs a job gets"
    )
    parser.add_argument(
        "--max-resource", type=int, help="Hyperband: most epochs a job gets (default: epochs)"
    )
    parser.add_argument(
        "--leaderboard",
        metavar="TUNING_JOB",
        help="start nothing: print the leaderboard of this tuning job and write --best-out",
    )
    parser.add_argument(
        "--best-out",
        type=Path,
        default=Path("best.json"),
        help="where the best job's hyperparameters go (default: %(default)s)",
    )


def _ranges(args: argparse.Namespace) -> Any:  # the SDK's dict[str | PipelineVariable, ...]
    try:
        sizes = [int(size) for size in args.batch_sizes.split(",")]
    except ValueError as exc:
        raise LaunchError(
            f"--batch-sizes {args.batch_sizes!r}: give integers, e.g. 16,32,64"
        ) from exc
    for name in ("lr", "weight_decay", "frozen_epochs"):
        low, high = getattr(args, name)
        if not 0 <= low < high:
            flag = "--" + name.replace("_", "-")
            raise LaunchError(f"{flag} {low} {high}: give MIN < MAX, both >= 0")
    if args.lr[0] <= 0 or args.weight_decay[0] <= 0:
        raise LaunchError("--lr and --weight-decay are searched on a log scale: MIN must be > 0")
    return {
        "lr": ContinuousParameter(args.lr[0], args.lr[1], scaling_type="Logarithmic"),
        "batch_size": CategoricalParameter(sizes),
        "frozen_epochs": IntegerParameter(
            args.frozen_epochs[0], args.frozen_epochs[1], scaling_type="Linear"
        ),
        "weight_decay": ContinuousParameter(
            args.weight_decay[0], args.weight_decay[1], scaling_type="Logarithmic"
        ),
    }


def _static(args: argparse.Namespace) -> dict[str, str]:
    values = hyperparameters(args.hyperparameters, args.set)
    tuned = sorted(k for k in values if k.replace("-", "_") in TUNED)
    if tuned:
        raise LaunchError(f"{', '.join(tuned)} are tuned: leave them out of the static values")
    if args.debugger == "service":
        raise LaunchError(
            "--debugger service: a tuning job's training jobs cannot have SageMaker Debugger "
            "(HyperParameterTrainingJobDefinition has no DebugHookConfig): use --debugger auto, "
            "where each job records its own tensors and evaluates the rules itself, or off"
        )
    if args.debugger == "auto":
        return {"save_tensors": "true", **values}  # the user's own value wins
    return values


def _strategy(args: argparse.Namespace, static: Mapping[str, str]) -> dict[str, Any]:
    if args.strategy != "Hyperband":
        return {"strategy": args.strategy, "early_stopping_type": args.early_stopping}
    epochs = int(static.get("epochs", Hyperparameters.model_fields["epochs"].default))
    top = args.max_resource or epochs
    if not 1 <= args.min_resource < top:
        raise LaunchError(f"Hyperband: --min-resource {args.min_resource} must be < {top} epochs")
    # Hyperband stops jobs itself; the API rejects it with early stopping on.
    return {
        "strategy": "Hyperband",
        "early_stopping_type": "Off",
        "strategy_config": StrategyConfig(HyperbandStrategyConfig(top, args.min_resource)),
    }


def run(args: argparse.Namespace, common: Common) -> int:
    if args.leaderboard:
        aws = Aws.connect(common)
        return _report(aws, args.leaderboard, args.best_out)
    common.need("role")
    common.need("image_uri")
    static = _static(args)
    ranges = _ranges(args)
    strategy = _strategy(args, static)
    aws = Aws.connect(common)
    base = estimator(
        aws, args, hyperparameters=static, debugger_hook_config=False, disable_profiler=True
    )
    tuner = HyperparameterTuner(
        base,
        objective_metric_name=OBJECTIVE_METRIC,
        objective_type="Maximize",
        hyperparameter_ranges=ranges,
        metric_definitions=metric_definitions(),  # not inherited from the estimator
        max_jobs=args.max_jobs,
        max_parallel_jobs=args.max_parallel_jobs,
        **strategy,
    )
    name = job_name(common.prefix, "tune", limit=32)
    print(f"tuning job {name}")
    print(console_url(aws.region, "hyper-tuning-jobs", name))
    tuner.fit(channels(aws, args), job_name=name, wait=False)
    if not args.wait:
        print(f"started; later: launch tune --leaderboard {name}")
        return 0
    tuner.wait()
    return _report(aws, name, args.best_out)


@dataclass(frozen=True)
class Trial:
    """One training job of a tuning job, as the leaderboard shows it."""

    name: str
    status: str
    objective: float | None
    seconds: float | None
    hyperparameters: dict[str, str]
    failure: str | None = None

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> Trial:
        """From one HyperParameterTrainingJobSummary (ListTrainingJobsForHyperParameterTuningJob,
        or DescribeHyperParameterTuningJob's BestTrainingJob)."""
        metric = summary.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
        start, end = summary.get("TrainingStartTime"), summary.get("TrainingEndTime")
        seconds = (
            (end - start).total_seconds()
            if isinstance(start, datetime) and isinstance(end, datetime)
            else None
        )
        return cls(
            name=str(summary["TrainingJobName"]),
            status=str(summary.get("TrainingJobStatus", "?")),
            objective=float(metric["Value"]) if "Value" in metric else None,
            seconds=seconds,
            hyperparameters=_user_values(summary.get("TunedHyperParameters", {})),
            failure=summary.get("FailureReason"),
        )


def _user_values(values: Mapping[str, Any]) -> dict[str, str]:
    return {
        str(k): str(v)
        for k, v in values.items()
        if not str(k).startswith(_INTERNAL_PREFIX) and k not in _INTERNAL_KEYS
    }


def leaderboard(summaries: Iterable[Mapping[str, Any]], maximize: bool = True) -> list[Trial]:
    """Every training job, best objective first; jobs without an objective last."""
    trials = [Trial.from_summary(s) for s in summaries]
    sign = -1.0 if maximize else 1.0
    return sorted(trials, key=lambda t: (t.objective is None, sign * (t.objective or 0.0), t.name))


def best_hyperparameters(
    tuning: Mapping[str, Any], trials: Iterable[Trial] = ()
) -> dict[str, str] | None:
    """The best job's hyperparameters as the tuner gave them: the static ones of the job
    definition, then the tuned ones; without the tuner's and the SDK's internal keys. From
    DescribeHyperParameterTuningJob's BestTrainingJob, else the first ranked trial with an
    objective; None when no job has one."""
    definition = tuning.get("TrainingJobDefinition") or {}
    static = _user_values(definition.get("StaticHyperParameters") or {})
    best = tuning.get("BestTrainingJob")
    if best:
        tuned = _user_values(best.get("TunedHyperParameters", {}))
        searched = _searched(tuning)
        if searched and set(tuned) != searched:
            # moto answers a fixed placeholder ({"string": ...}); AWS never mixes names up.
            raise ValueError(
                f"BestTrainingJob {best.get('TrainingJobName')} has tuned values for "
                f"{', '.join(sorted(tuned)) or 'nothing'}, but the job searches "
                f"{', '.join(sorted(searched))}"
            )
        return {**static, **tuned}
    ranked = [t for t in trials if t.objective is not None]
    return {**static, **ranked[0].hyperparameters} if ranked else None


def _searched(tuning: Mapping[str, Any]) -> set[str]:
    ranges = tuning.get("HyperParameterTuningJobConfig", {}).get("ParameterRanges", {})
    return {r["Name"] for kind in ranges.values() for r in kind}


def format_leaderboard(trials: Iterable[Trial], metric: str) -> str:
    """A plain-text table: rank, job, status, objective, minutes, tuned hyperparameters."""
    rows = [("#", "training job", "status", metric, "min", "hyperparameters")]
    for rank, trial in enumerate(trials, 1):
        values = " ".join(f"{k}={v}" for k, v in sorted(trial.hyperparameters.items()))
        rows.append(
            (
                str(rank),
                trial.name,
                trial.status,
                "-" if trial.objective is None else f"{trial.objective:.4f}",
                "-" if trial.seconds is None else f"{trial.seconds / 60:.1f}",
                values + (f" ({trial.failure})" if trial.failure else ""),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        + "  "
        + row[5]
        for row in rows
    )


def _summaries(aws: Aws, name: str) -> list[dict[str, Any]] | None:
    """Every training job of the tuning job; None where the API cannot list them (moto)."""
    client = aws.sagemaker.sagemaker_client
    try:
        pages = client.get_paginator("list_training_jobs_for_hyper_parameter_tuning_job")
        return [
            summary
            for page in pages.paginate(HyperParameterTuningJobName=name)
            for summary in page["TrainingJobSummaries"]
        ]
    except ClientError as exc:
        logger.debug("ListTrainingJobsForHyperParameterTuningJob failed: %s", exc)
        print(
            "leaderboard unavailable: this endpoint does not answer "
            f"ListTrainingJobsForHyperParameterTuningJob ({exc.response['Error'].get('Code')})"
        )
        return None


def _report(aws: Aws, name: str, best_out: Path) -> int:
    tuning = aws.sagemaker.sagemaker_client.describe_hyper_parameter_tuning_job(
        HyperParameterTuningJobName=name
    )
    status = tuning["HyperParameterTuningJobStatus"]
    objective = tuning["HyperParameterTuningJobConfig"]["HyperParameterTuningJobObjective"]
    counts = tuning.get("TrainingJobStatusCounters", {})
    print(
        f"tuning job {name}: {status}; training jobs: "
        + ", ".join(f"{k} {v}" for k, v in counts.items() if v)
    )
    summaries = _summaries(aws, name)
    trials = leaderboard(summaries or [], objective["Type"] == "Maximize")
    if trials:
        print(format_leaderboard(trials, objective["MetricName"]))
    try:
        best = best_hyperparameters(tuning, trials)
    except ValueError as exc:
        print(f"best hyperparameters not written: {exc}")
        best = {}
    if best is None:
        print(f"no training job reported {objective['MetricName']} yet: {best_out} not written")
    elif best:
        best_out.write_text(json.dumps(best, indent=2, sort_keys=True) + "\n")
        print(f"best hyperparameters -> {best_out} (launch train --hyperparameters {best_out})")
    if status in ("Failed", "Stopped"):
        raise job_ended("tuning", name, status, tuning.get("FailureReason"))
    return 0
