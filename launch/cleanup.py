"""`launch cleanup`: delete the hosting resources `deploy` made, so nothing keeps billing.

It finds endpoints, endpoint configs and models tagged created-by=launch with this prefix (the
tags `deploy` sets; nothing else is touched), lists them, asks, then deletes in dependency order:
the autoscaling of each endpoint first, then endpoints, their configs, and the models.
Training and tuning jobs are not deletable and cost nothing once stopped, so they are left alone.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from botocore.exceptions import ClientError

from launch.aws import Aws
from launch.hosting import CREATED_BY, PREFIX_TAG, SCALABLE_DIMENSION, scalable_resource
from launch.settings import Common

__all__ = ["HELP", "Found", "add_arguments", "find", "run"]

HELP = "delete the endpoints, endpoint configs, models and autoscaling that deploy created"


@dataclass(frozen=True)
class Found:
    """One resource to delete: its kind as printed, and its name."""

    kind: str
    name: str


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


def find(aws: Aws, prefix: str) -> list[Found]:
    """Everything `deploy` made for `prefix`, scaling targets first, models last: delete order."""
    client = aws.boto.client("sagemaker")
    found = [
        Found(kind, item[name_key])
        for kind, (call, key, name_key, arn_key, *_) in _KINDS.items()
        for item in _listed(client, call, key)
        if _ours(client, item[arn_key], prefix)
    ]
    scaling = aws.boto.client("application-autoscaling")
    endpoints = [scalable_resource(f.name) for f in found if f.kind == "endpoint"]
    targets = (
        scaling.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=endpoints)[
            "ScalableTargets"
        ]
        if endpoints
        else []
    )
    return [Found("scaling-target", t["ResourceId"]) for t in targets] + found


def _delete(aws: Aws, item: Found) -> None:
    if item.kind == "scaling-target":
        aws.boto.client("application-autoscaling").deregister_scalable_target(
            ServiceNamespace="sagemaker", ResourceId=item.name, ScalableDimension=SCALABLE_DIMENSION
        )
        return
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
        print(f"  {item.kind:<{width}}  {item.name}")
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
