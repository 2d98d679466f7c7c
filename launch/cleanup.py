"""`launch cleanup`: delete the hosting resources `deploy` made, so nothing keeps billing.

It finds endpoints, endpoint configs and models tagged created-by=launch with this prefix (the
tags `deploy` sets; nothing else is touched), and for those endpoints their autoscaling: the
scalable target, its policies and the alarm that wakes an asynchronous endpoint from zero
(launch.scaling names them). It lists them, asks, then deletes in dependency order: alarms,
policies, scaling targets, endpoints, their configs, models. S3 objects stay: an asynchronous
endpoint's results and failures and a multi-model endpoint's models are data, and the listing
says where they are. Training and tuning jobs are not deletable and cost nothing once stopped, so
they are left alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from launch.aws import Aws
from launch.hosting import CREATED_BY, PREFIX_TAG
from launch.multi_model import MODE
from launch.scaling import NAMESPACE, SCALABLE_DIMENSION, scalable_resource, wake_alarm_name
from launch.settings import Common

__all__ = ["HELP", "Found", "add_arguments", "find", "kept_in_s3", "run"]

HELP = "delete the endpoints, endpoint configs, models, autoscaling and alarms that deploy created"

_ALARMS_PER_CALL = 100  # DescribeAlarms' limit on AlarmNames


@dataclass(frozen=True)
class Found:
    """One resource to delete: its kind as printed, its name, and for a scaling policy the
    scalable target (ResourceId) it belongs to."""

    kind: str
    name: str
    resource: str = ""


# kind: (list call, result key, name key, arn key, delete call, delete parameter)
_KINDS: dict[str, tuple[str, str, str, str, str, str]] = {
    "endpoint": (
        "list_endpoints",
        "Endpoints",
        "EndpointName",
        "EndpointArn",
        "delete_endpoint",
        "EndpointName",
    ),
    "endpoint-config": (
        "list_endpoint_configs",
        "EndpointConfigs",
        "EndpointConfigName",
        "EndpointConfigArn",
        "delete_endpoint_config",
        "EndpointConfigName",
    ),
    "model": ("list_models", "Models", "ModelName", "ModelArn", "delete_model", "ModelName"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--yes", action="store_true", help="delete without asking")
    parser.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")


def _listed(client: Any, call: str, key: str) -> Iterator[dict[str, Any]]:
    for page in client.get_paginator(call).paginate():
        yield from page[key]


def _ours(client: Any, arn: str, prefix: str) -> bool:
    found = {t["Key"]: t["Value"] for t in client.list_tags(ResourceArn=arn).get("Tags", [])}
    return found.get(CREATED_BY[0]) == CREATED_BY[1] and found.get(PREFIX_TAG) == prefix


def _scaling(aws: Aws, endpoints: list[str]) -> list[Found]:
    """The endpoints' wake-up alarms, scaling policies and scalable targets, in delete order
    (AWS deletes a target's policies with it; moto does not, and listing them says what goes)."""
    if not endpoints:
        return []
    names = [wake_alarm_name(e) for e in endpoints]
    cloudwatch = aws.boto.client("cloudwatch")
    alarms = [
        Found("alarm", alarm["AlarmName"])
        for i in range(0, len(names), _ALARMS_PER_CALL)
        for alarm in cloudwatch.describe_alarms(AlarmNames=names[i : i + _ALARMS_PER_CALL])[
            "MetricAlarms"
        ]
    ]
    client = aws.boto.client("application-autoscaling")
    resources = [scalable_resource(e) for e in endpoints]
    policies = [
        Found("scaling-policy", policy["PolicyName"], resource)
        for resource in resources
        for policy in client.describe_scaling_policies(
            ServiceNamespace=NAMESPACE, ResourceId=resource
        )["ScalingPolicies"]
    ]
    targets = client.describe_scalable_targets(ServiceNamespace=NAMESPACE, ResourceIds=resources)
    return [
        *alarms,
        *policies,
        *(Found("scaling-target", t["ResourceId"]) for t in targets["ScalableTargets"]),
    ]


def find(aws: Aws, prefix: str) -> list[Found]:
    """Everything `deploy` made for `prefix`, alarms and autoscaling first, models last: delete
    order."""
    client = aws.boto.client("sagemaker")
    found = [
        Found(kind, item[name_key])
        for kind, (call, key, name_key, arn_key, *_) in _KINDS.items()
        for item in _listed(client, call, key)
        if _ours(client, item[arn_key], prefix)
    ]
    return _scaling(aws, [f.name for f in found if f.kind == "endpoint"]) + found


def kept_in_s3(aws: Aws, found: list[Found]) -> list[str]:
    """What the found configs and models point to in S3 and cleanup leaves: asynchronous results
    and failures, multi-model prefixes."""
    client = aws.boto.client("sagemaker")
    kept: list[str] = []
    for item in found:
        if item.kind == "endpoint-config":
            config = client.describe_endpoint_config(EndpointConfigName=item.name)
            output = config.get("AsyncInferenceConfig", {}).get("OutputConfig", {})
            for key, what in (("S3OutputPath", "results"), ("S3FailurePath", "failures")):
                if output.get(key):
                    kept.append(f"{output[key]} ({what} of {item.name})")
        elif item.kind == "model":
            model = client.describe_model(ModelName=item.name)
            container = model.get("PrimaryContainer") or (model.get("Containers") or [{}])[0]
            if container.get("Mode") == MODE:
                kept.append(f"{container['ModelDataUrl']} (the models of {item.name})")
    return kept


def _delete(aws: Aws, item: Found) -> None:
    scaling = aws.boto.client("application-autoscaling")
    if item.kind == "alarm":
        aws.boto.client("cloudwatch").delete_alarms(AlarmNames=[item.name])
    elif item.kind == "scaling-policy":
        scaling.delete_scaling_policy(
            PolicyName=item.name,
            ServiceNamespace=NAMESPACE,
            ResourceId=item.resource,
            ScalableDimension=SCALABLE_DIMENSION,
        )
    elif item.kind == "scaling-target":
        scaling.deregister_scalable_target(
            ServiceNamespace=NAMESPACE, ResourceId=item.name, ScalableDimension=SCALABLE_DIMENSION
        )
    else:
        *_, call, parameter = _KINDS[item.kind]
        getattr(aws.boto.client("sagemaker"), call)(**{parameter: item.name})


def run(args: argparse.Namespace, common: Common) -> int:
    aws = Aws.connect(common)
    found = find(aws, common.prefix)
    if not found:
        print(
            f"nothing to delete: no resources tagged {CREATED_BY[0]}={CREATED_BY[1]}, "
            f"{PREFIX_TAG}={common.prefix} in {aws.region}"
        )
        return 0
    width = max(len(f.kind) for f in found)
    print(f"{len(found)} resource(s) created by launch for prefix {common.prefix!r}:")
    for item in found:
        on = f" (on {item.resource})" if item.resource else ""
        print(f"  {item.kind:<{width}}  {item.name}{on}")
    kept = kept_in_s3(aws, found)
    if kept:
        print("S3 objects are not deleted (aws s3 rm --recursive URI, if they should go):")
        for line in kept:
            print(f"  {line}")
    if args.dry_run:
        print("dry run: nothing deleted")
        return 0
    if not args.yes:
        print("delete them? [y/N] ", end="", flush=True)
        answer = sys.stdin.readline().strip().lower()
        if answer not in ("y", "yes"):
            print("nothing deleted")
            return 1
    failed = 0
    for item in found:
        try:
            _delete(aws, item)
        except ClientError as exc:  # e.g. deleted by hand meanwhile: say so, go on with the rest
            print(f"launch: could not delete {item.kind} {item.name}: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"deleted {item.kind} {item.name}")
    return 1 if failed else 0
