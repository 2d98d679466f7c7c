"""`launch train`: one training job with the image, through the SDK v2 `Estimator`.

The job gets SageMaker Debugger (a hook config and the built-in rules that read its tensors) and the
platform's system profiler where the account has them, optional managed spot with checkpoints, and
FastFile input by default. Debugger is closed to accounts new since 2026-07-30 (AWS docs, "Debugger
availability change"), so by default (`--debugger auto`) a CreateTrainingJob refused for it is sent
again without it, and the job records its own tensors in its output (hyperparameter save_tensors);
the job evaluates the rules itself either way, and `launch report` reads both.
Multi-host needs no `distribution=`: the image reads resourceconfig.json and starts its own
processes (container/training/distributed.py, docs/sagemaker-contract.md §2.6). `launch tune` builds
its training jobs from the same pieces (`estimator`, `channels`, `hyperparameters`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import smdebug_rulesconfig as rule_configs  # type: ignore[import-untyped]  # = sagemaker.debugger.rule_configs
from botocore.exceptions import ClientError
from sagemaker.debugger.debugger import CollectionConfig, DebuggerHookConfig, Rule
from sagemaker.debugger.profiler_config import ProfilerConfig
from sagemaker.estimator import Estimator
from sagemaker.exceptions import UnexpectedStatusException
from sagemaker.fw_utils import DEBUGGER_UNSUPPORTED_REGIONS
from sagemaker.inputs import TrainingInput

from container.sagemaker_env import (
    DATA_CHANNELS,
    UNKNOWN_CHANNEL,
    ConfigFileError,
    decode_hyperparameters,
    encode_hyperparameters,
)
from container.training.hyperparameters import Hyperparameters
from container.training.metrics import METRIC_DEFINITIONS
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError, job_ended
from launch.settings import Common, add_wait_argument

__all__ = [
    "DEBUGGER_CHOICES",
    "HELP",
    "RULES",
    "add_arguments",
    "add_estimator_arguments",
    "channels",
    "debugger_refused",
    "estimator",
    "hyperparameters",
    "metric_definitions",
    "run",
]

logger = logging.getLogger(__name__)

HELP = "Train one model: a SageMaker training job with Debugger (--debugger), profiler and spot."


DEBUG_COLLECTIONS = ("losses", "gradients", "weights", "biases")

# The built-in rules worth running on a fine-tune; each is a processing job on AWS's rule image
# that reads the hook's tensors as they reach S3 (docs/sagemaker-contract.md §3.3).
RULES = {
    "loss_not_decreasing": rule_configs.loss_not_decreasing,
    "vanishing_gradient": rule_configs.vanishing_gradient,
    "overfit": rule_configs.overfit,
    "overtraining": rule_configs.overtraining,
    "poor_weight_initialization": rule_configs.poor_weight_initialization,
}

# The intervals ProfilerConfig accepts (milliseconds).
PROFILER_INTERVALS = (100, 200, 500, 1000, 5000, 60000)

DEBUGGER_CHOICES = ("auto", "service", "off")
"""--debugger: the service's Debugger when it can (auto), always (service), or never (off)."""


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    """What a training job runs on and reads: shared by `train` and `tune`."""
    parser.add_argument("--instance-type", default="ml.g4dn.xlarge", help="(default: %(default)s)")
    parser.add_argument(
        "--input-mode",
        default="FastFile",
        choices=("FastFile", "File", "Pipe"),
        help="how channels reach the container (default: %(default)s, streamed from S3)",
    )
    parser.add_argument("--max-run", type=int, default=24 * 3600, help="seconds (%(default)s)")
    parser.add_argument("--volume-size", type=int, default=30, help="GB of EBS (%(default)s)")
    for name in DATA_CHANNELS:
        parser.add_argument(
            f"--{name}", metavar="S3_URI", help=f"the {name} channel (default: PREFIX/data/{name}/)"
        )
    parser.add_argument(
        f"--{UNKNOWN_CHANNEL}",
        metavar="S3_URI",
        help="images of none of the classes (other animals, people, objects): the abstention "
        "threshold is set and checked on them; with train_unknown=true also trained on",
    )
    parser.add_argument(
        "--hyperparameters",
        type=Path,
        metavar="JSON",
        help="a JSON object of hyperparameters (e.g. what `launch tune --best-out` wrote)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one hyperparameter, over the file's (repeatable)",
    )
    add_wait_argument(parser, "for the job to end")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_estimator_arguments(parser)
    parser.add_argument(
        "--instance-count",
        type=int,
        default=1,
        help="hosts; more than 1 = data-parallel over all their GPUs (default: %(default)s)",
    )
    parser.add_argument(
        "--logs",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the job's CloudWatch log while waiting (default: on)",
    )
    parser.add_argument(
        "--spot", action="store_true", help="managed spot training (resumes from checkpoints)"
    )
    parser.add_argument(
        "--max-wait",
        type=int,
        help="spot: seconds to wait for capacity and run, > --max-run (default: 2 x max-run)",
    )
    parser.add_argument(
        "--checkpoint-s3-uri", help="where /opt/ml/checkpoints syncs (default: PREFIX/checkpoints/)"
    )
    parser.add_argument(
        "--save-interval",
        type=int,
        default=10,
        help="Debugger: save tensors every N steps (losses every step) (default: %(default)s)",
    )
    parser.add_argument(
        "--debugger",
        default="auto",
        choices=DEBUGGER_CHOICES,
        help="auto: ask for SageMaker Debugger's hook, built-in rules and profiler, and if "
        "CreateTrainingJob refuses them (Debugger is closed to accounts new since 2026-07-30) "
        "start the job again without them, recording its own tensors (save_tensors=true); "
        "service: the service's or fail; off: neither. The job evaluates the rules itself "
        "in every case (default: %(default)s)",
    )
    parser.add_argument(  # the flag's name before --debugger
        "--no-debugger", dest="debugger", action="store_const", const="off", help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--profiler-interval",
        type=int,
        default=500,
        choices=PROFILER_INTERVALS,
        help="system monitor interval in ms (default: %(default)s)",
    )


def hyperparameters(file: Path | None, pairs: Sequence[str]) -> dict[str, str]:
    """The file's values, then KEY=VALUE pairs; checked against the image's schema by name and by
    value, and passed on as strings (as the tuner gave them)."""
    values: dict[str, Any] = {}
    if file is not None:
        try:
            loaded = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LaunchError(f"cannot read hyperparameters from {file}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise LaunchError(f"{file} is not a JSON object of hyperparameters")
        values.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise LaunchError(f"--set {pair!r}: write KEY=VALUE, e.g. --set epochs=5")
        values[key.strip()] = value
    unknown = sorted(k for k in values if k.replace("-", "_") not in Hyperparameters.model_fields)
    if unknown:
        raise LaunchError(
            f"unknown hyperparameter(s) {', '.join(unknown)}: the image knows "
            f"{', '.join(Hyperparameters.model_fields)}"
        )
    encoded = encode_hyperparameters(values)
    try:
        decode_hyperparameters(encoded, Hyperparameters)
    except ConfigFileError as exc:
        raise LaunchError(str(exc)) from exc
    return encoded


def channels(aws: Aws, args: argparse.Namespace) -> dict[str, TrainingInput]:
    """Every channel as a TrainingInput with the chosen input mode; `unknown` when given."""
    uris = {name: getattr(args, name) or aws.s3_uri("data", name) + "/" for name in DATA_CHANNELS}
    if args.unknown:
        uris[UNKNOWN_CHANNEL] = args.unknown
    return {name: TrainingInput(uri, input_mode=args.input_mode) for name, uri in uris.items()}


def estimator(aws: Aws, args: argparse.Namespace, **options: Any) -> Estimator:
    """The image as an Estimator; `options` add Debugger, spot and the like."""
    common = aws.common
    return Estimator(
        image_uri=common.need("image_uri"),
        role=common.need("role"),
        instance_count=getattr(args, "instance_count", 1),
        instance_type=args.instance_type,
        volume_size=args.volume_size,
        max_run=args.max_run,
        input_mode=args.input_mode,
        output_path=aws.s3_uri("output"),
        metric_definitions=metric_definitions(),
        sagemaker_session=aws.sagemaker,
        **options,
    )


def metric_definitions() -> list[dict[str, Any]]:
    """The image's regexes (container/training/metrics.py), as the SDK's signature types them."""
    return [dict(d) for d in METRIC_DEFINITIONS]


def _service_debugger(aws: Aws, args: argparse.Namespace) -> dict[str, Any]:
    """The service's hook, its built-in rules and its system profiler, as Estimator options."""
    interval = str(args.save_interval)
    ours = {
        name: CollectionConfig(name, {"save_interval": "1" if name == "losses" else interval})
        for name in DEBUG_COLLECTIONS
    }
    return {
        "debugger_hook_config": DebuggerHookConfig(
            s3_output_path=aws.s3_uri("debug"),
            hook_parameters={"save_interval": interval},
            collection_configs=list(ours.values()),
        ),
        "rules": [_rule(make, ours, interval) for make in RULES.values()],
        # System monitoring only: framework profiling is deprecated for PyTorch >= 2
        # (docs/sagemaker-contract.md §3.4), and the platform collects CPU/GPU/memory/IO for any
        # container.
        "profiler_config": ProfilerConfig(
            s3_output_path=aws.s3_uri("profiler"),
            system_monitor_interval_millis=args.profiler_interval,
        ),
    }


# Without the service: no hook config, no rules; the SDK then sends ProfilerConfig
# {"DisableProfiler": true}, as it does by itself in the regions that have no profiler.
_NO_SERVICE: dict[str, Any] = {"debugger_hook_config": False, "disable_profiler": True}


def debugger_refused(exc: ClientError) -> bool:
    """Whether CreateTrainingJob refused the job for its Debugger or profiler settings.

    AWS publishes no error for an account that Debugger is closed to (the "Debugger availability
    change" note on every Debugger page of the SageMaker developer guide). Where a region lacks
    the service the API answers ValidationException naming the field, e.g. "ProfilerConfig is
    currently not supported in cn-northwest-1" (aws/sagemaker-python-sdk#2134); an account
    refused a feature gets AccessDenied(Exception). Either, naming Debug* or Profiler*, counts.
    """
    error = exc.response.get("Error", {})
    message = str(error.get("Message", "")).lower()
    return (
        exc.operation_name == "CreateTrainingJob"
        and error.get("Code") in _REFUSALS
        and any(word in message for word in ("debug", "profiler"))
    )


_REFUSALS = frozenset({"ValidationException", "AccessDeniedException", "AccessDenied"})


def _rule(make: Any, ours: Mapping[str, CollectionConfig], interval: str) -> Rule:
    """A built-in rule that reads our collections at our intervals. Its defaults (losses every
    500 steps, relu_input every 500) would replace ours in the hook config, where the SDK keeps
    the first CollectionConfig of each name: too few points for a short fine-tune."""
    defaults = Rule.sagemaker(make()).collection_configs
    wanted = [
        ours.get(c.name) or CollectionConfig(c.name, {**c.parameters, "save_interval": interval})
        for c in defaults
    ]
    rule: Rule = Rule.sagemaker(make(), collections_to_save=wanted)
    return rule


def _spot(aws: Aws, args: argparse.Namespace) -> dict[str, Any]:
    checkpoints = args.checkpoint_s3_uri
    if not args.spot:
        return {"checkpoint_s3_uri": checkpoints} if checkpoints else {}
    max_wait = args.max_wait or 2 * args.max_run
    if max_wait < args.max_run:
        raise LaunchError(f"--max-wait {max_wait} must be at least --max-run {args.max_run}")
    return {
        "use_spot_instances": True,
        "max_wait": max_wait,
        "checkpoint_s3_uri": checkpoints or aws.s3_uri("checkpoints"),
    }


def final_metrics(description: Mapping[str, Any]) -> dict[str, float]:
    """FinalMetricDataList of a DescribeTrainingJob response, by name."""
    return {m["MetricName"]: float(m["Value"]) for m in description.get("FinalMetricDataList", [])}


def run(args: argparse.Namespace, common: Common) -> int:
    common.need("role")
    common.need("image_uri")
    values = hyperparameters(args.hyperparameters, args.set)
    if args.instance_count < 1:
        raise LaunchError(f"--instance-count {args.instance_count}: give 1 or more")
    aws = Aws.connect(common)
    name = job_name(common.prefix, "train")
    print(f"training job {name}")
    print(console_url(aws.region, "jobs", name))
    service = args.debugger != "off"
    if service and aws.region in DEBUGGER_UNSUPPORTED_REGIONS:  # the SDK raises a bare ValueError
        why = f"SageMaker Debugger is not offered in {aws.region}"
        if args.debugger == "service":
            raise LaunchError(f"--debugger service: {why}; use --debugger auto or off")
        print(f"{why}: {_OWN_TENSORS}")
        service = False
    try:
        _fit(aws, args, name, values, service)
    except ClientError as exc:
        if not (service and debugger_refused(exc)):
            raise
        error = exc.response["Error"]
        why = f"CreateTrainingJob refused Debugger ({error.get('Code')}: {error.get('Message')})"
        if args.debugger == "service":
            raise LaunchError(
                f"--debugger service: {why}; Debugger is closed to accounts new since "
                "2026-07-30: use --debugger auto (the job evaluates the rules itself) or off"
            ) from exc
        print(f"{why}: starting {name} again without it; {_OWN_TENSORS}")
        _fit(aws, args, name, values, service=False)
    if not args.wait:
        print(f"started; follow it with: launch report {name}")
        return 0
    if args.logs:
        print()  # the SDK's log stream ends without a newline
    description = aws.sagemaker.describe_training_job(name)
    print(f"model: {description['ModelArtifacts']['S3ModelArtifacts']}")
    for metric, value in final_metrics(description).items():
        print(f"{metric} = {value:g}")
    return 0


_OWN_TENSORS = "the job records its own tensors (save_tensors=true) for launch report"


def _fit(
    aws: Aws, args: argparse.Namespace, name: str, values: Mapping[str, str], service: bool
) -> None:
    """Create the job `name` (and wait, as asked): with the service's Debugger, or without it
    and, under --debugger auto, with the job's own tensor recording in its place."""
    if service:
        options = _service_debugger(aws, args)
    else:
        options = dict(_NO_SERVICE)
        if args.debugger == "auto":
            values = {"save_tensors": "true", **values}  # the user's own value wins
    job = estimator(aws, args, hyperparameters=dict(values), **options, **_spot(aws, args))
    try:
        job.fit(
            channels(aws, args), job_name=name, wait=args.wait, logs="All" if args.logs else "None"
        )
    except UnexpectedStatusException as exc:
        failed = aws.sagemaker.describe_training_job(name)
        raise job_ended(
            "training", name, failed["TrainingJobStatus"], failed.get("FailureReason")
        ) from exc
