"""Autoscaling of an endpoint's one variant: Application Auto Scaling, and for an asynchronous
endpoint that may scale to zero, the CloudWatch alarm that wakes it.

The SDK v2 has no wrapper for either, so this is boto3. A real-time endpoint tracks invocations per
instance (the predefined SageMakerVariantInvocationsPerInstance). An asynchronous endpoint tracks
its queue instead, the custom metric ApproximateBacklogSizePerInstance, and may go down to zero
instances; since a target-tracking policy has nothing to divide by at zero, AWS's recipe for scaling
out from zero is a step-scaling policy (+1 instance) fired by an alarm on HasBacklogWithoutCapacity
(AWS docs: "Autoscale an asynchronous endpoint"). `launch cleanup` finds all of it through the
names below: the policies by the endpoint's variant, the alarm by its name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from launch.aws import Aws
from launch.errors import LaunchError

__all__ = [
    "NAMESPACE",
    "SCALABLE_DIMENSION",
    "VARIANT",
    "Backlog",
    "Invocations",
    "Limits",
    "Target",
    "parse_limits",
    "register",
    "scalable_resource",
    "wake_alarm_name",
]

NAMESPACE = "sagemaker"
"""Application Auto Scaling's service namespace of SageMaker variants."""
VARIANT = "AllTraffic"
"""The one production variant the SDK gives an endpoint it deploys."""
SCALABLE_DIMENSION = "sagemaker:variant:DesiredInstanceCount"
_METRIC_NAMESPACE = "AWS/SageMaker"
_INVOCATIONS_METRIC = "SageMakerVariantInvocationsPerInstance"
_BACKLOG_METRIC = "ApproximateBacklogSizePerInstance"
_WAKE_METRIC = "HasBacklogWithoutCapacity"


@dataclass(frozen=True)
class Limits:
    """The instance counts autoscaling keeps the variant between."""

    low: int
    high: int


@dataclass(frozen=True)
class Invocations:
    """Target tracking of a real-time endpoint: invocations per instance per minute."""

    per_instance: int

    def describe(self) -> str:
        return f"target {self.per_instance} invocations per instance per minute"


@dataclass(frozen=True)
class Backlog:
    """Target tracking of an asynchronous endpoint: queued requests per instance."""

    per_instance: float

    def describe(self) -> str:
        return f"target {self.per_instance:g} queued requests per instance ({_BACKLOG_METRIC})"


Target = Invocations | Backlog


def parse_limits(value: str, lowest: int) -> Limits:
    """--autoscale MIN:MAX, MIN at least `lowest` (0 only where the endpoint may scale to zero)."""
    low, sep, high = value.partition(":")
    numbers = sep and low.isdigit() and high.isdigit()
    if not (numbers and lowest <= int(low) <= int(high) and int(high) >= 1):
        zero = "" if lowest == 0 else " (MIN 0, scaling to zero, is for --async endpoints)"
        raise LaunchError(
            f"--autoscale {value!r}: use MIN:MAX with {lowest} <= MIN <= MAX, MAX at least 1, "
            f"e.g. {lowest}:4{zero}"
        )
    return Limits(int(low), int(high))


def scalable_resource(endpoint: str) -> str:
    """Application Auto Scaling's ResourceId of an endpoint's one variant."""
    return f"endpoint/{endpoint}/variant/{VARIANT}"


def wake_alarm_name(endpoint: str) -> str:
    """The alarm that scales an asynchronous endpoint out from zero instances."""
    return f"{endpoint}-{_WAKE_METRIC}"


def _tracking(endpoint: str, target: Target) -> dict[str, Any]:
    if isinstance(target, Invocations):
        return {
            "TargetValue": float(target.per_instance),
            "PredefinedMetricSpecification": {"PredefinedMetricType": _INVOCATIONS_METRIC},
            "ScaleInCooldown": 300,
            "ScaleOutCooldown": 60,
        }
    return {
        "TargetValue": float(target.per_instance),
        "CustomizedMetricSpecification": {
            "MetricName": _BACKLOG_METRIC,
            "Namespace": _METRIC_NAMESPACE,
            "Dimensions": [{"Name": "EndpointName", "Value": endpoint}],
            "Statistic": "Average",
        },
        # AWS's example values: requests take long, instances take minutes to come.
        "ScaleInCooldown": 600,
        "ScaleOutCooldown": 300,
    }


def register(
    aws: Aws, endpoint: str, limits: Limits, target: Target, tags: list[dict[str, str]]
) -> bool:
    """The scalable target and its policies (and the wake-up alarm for a backlog that may be at
    zero instances) on an endpoint that is InService; whether the alarm was made."""
    client = aws.boto.client("application-autoscaling")
    resource = scalable_resource(endpoint)
    where = {
        "ServiceNamespace": NAMESPACE,
        "ResourceId": resource,
        "ScalableDimension": SCALABLE_DIMENSION,
    }
    client.register_scalable_target(
        **where,
        MinCapacity=limits.low,
        MaxCapacity=limits.high,
        Tags={item["Key"]: item["Value"] for item in tags},
    )
    kind = "invocations" if isinstance(target, Invocations) else "backlog"
    client.put_scaling_policy(
        PolicyName=f"{endpoint}-{kind}",
        **where,
        PolicyType="TargetTrackingScaling",
        TargetTrackingScalingPolicyConfiguration=_tracking(endpoint, target),
    )
    if not (isinstance(target, Backlog) and limits.low == 0):
        return False
    step = client.put_scaling_policy(
        PolicyName=f"{endpoint}-{_WAKE_METRIC}",
        **where,
        PolicyType="StepScaling",
        StepScalingPolicyConfiguration={
            "AdjustmentType": "ChangeInCapacity",
            "MetricAggregationType": "Average",
            "Cooldown": 300,
            "StepAdjustments": [{"MetricIntervalLowerBound": 0, "ScalingAdjustment": 1}],
        },
    )
    aws.boto.client("cloudwatch").put_metric_alarm(
        AlarmName=wake_alarm_name(endpoint),
        AlarmDescription=f"scale {endpoint} out from zero instances when requests are queued",
        Namespace=_METRIC_NAMESPACE,
        MetricName=_WAKE_METRIC,
        Dimensions=[{"Name": "EndpointName", "Value": endpoint}],
        Statistic="Average",
        Period=60,
        EvaluationPeriods=2,
        DatapointsToAlarm=2,
        Threshold=1,
        ComparisonOperator="GreaterThanOrEqualToThreshold",
        TreatMissingData="missing",
        AlarmActions=[step["PolicyARN"]],
        Tags=tags,
    )
    return True
