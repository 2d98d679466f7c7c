"""`launch cleanup` against moto: it finds what deploy made (and only that), asks, deletes."""

from __future__ import annotations

from tests.launch.conftest import Launch
from tests.launch.test_hosting import deploy


def _deploy(launch: Launch, *flags: str) -> None:
    deploy(launch, "--instance-type", "ml.c5.xlarge", *flags)


_NOTHING_LEFT = {"endpoints": [], "configs": [], "models": [], "targets": [], "policies": []}


def _remaining(launch: Launch) -> dict[str, list[str]]:
    sagemaker = launch.client("sagemaker")
    scaling = launch.client("application-autoscaling")
    return {
        "endpoints": [e["EndpointName"] for e in sagemaker.list_endpoints()["Endpoints"]],
        "configs": [
            c["EndpointConfigName"] for c in sagemaker.list_endpoint_configs()["EndpointConfigs"]
        ],
        "models": [m["ModelName"] for m in sagemaker.list_models()["Models"]],
        "targets": [
            t["ResourceId"]
            for t in scaling.describe_scalable_targets(ServiceNamespace="sagemaker")[
                "ScalableTargets"
            ]
        ],
        "policies": [
            p["PolicyName"]
            for p in scaling.describe_scaling_policies(ServiceNamespace="sagemaker")[
                "ScalingPolicies"
            ]
        ],
    }


def test_cleanup_lists_asks_and_deletes_only_what_deploy_made(launch: Launch) -> None:
    _deploy(launch, "--endpoint-name", "ep-scaled", "--autoscale", "1:3")
    _deploy(launch, "--endpoint-name", "ep-plain")
    _deploy(launch, "--endpoint-name", "ep-other", "--prefix", "someone-else")
    before = _remaining(launch)
    assert len(before["models"]) == 3

    dry = launch("cleanup", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "8 resource(s)" in dry.stdout  # policy, target, 2 endpoints, 2 configs, 2 models
    assert (
        "scaling-policy   ep-scaled-invocations (on endpoint/ep-scaled/variant/AllTraffic)"
    ) in dry.stdout
    assert "scaling-target   endpoint/ep-scaled/variant/AllTraffic" in dry.stdout
    assert "S3 objects" not in dry.stdout  # real-time endpoints keep nothing there
    assert "ep-other" not in dry.stdout
    assert _remaining(launch) == before

    declined = launch("cleanup", stdin="n\n")
    assert declined.returncode == 1
    assert "delete them? [y/N]" in declined.stdout
    assert "nothing deleted" in declined.stdout
    assert _remaining(launch) == before

    done = launch("cleanup", "--yes")
    assert done.returncode == 0, done.stderr
    deleted = [line for line in done.stdout.splitlines() if line.startswith("deleted ")]
    assert deleted[:2] == [
        "deleted scaling-policy ep-scaled-invocations",
        "deleted scaling-target endpoint/ep-scaled/variant/AllTraffic",
    ]
    assert [line.split()[1] for line in deleted[2:]] == ["endpoint"] * 2 + [
        "endpoint-config"
    ] * 2 + ["model"] * 2
    after = _remaining(launch)
    assert after["endpoints"] == after["configs"] == ["ep-other"]
    assert len(after["models"]) == 1
    assert after["targets"] == after["policies"] == []

    launch.ok("cleanup", "--yes", "--prefix", "someone-else")
    assert _remaining(launch) == _NOTHING_LEFT
    again = launch.ok("cleanup", "--yes")
    assert "nothing to delete" in again.stdout


def test_cleanup_answering_yes_deletes(launch: Launch) -> None:
    _deploy(launch, "--endpoint-name", "ep-one")
    done = launch("cleanup", stdin="y\n")
    assert done.returncode == 0, done.stderr
    assert "deleted endpoint ep-one" in done.stdout
    assert _remaining(launch) == _NOTHING_LEFT
