"""`launch doctor` against moto: a healthy account passes, and each thing a new account gets wrong
fails its own row (exit status 1); what moto cannot answer is "could not check", never a traceback.
"""

from __future__ import annotations

import json
from typing import Any

from tests.launch.conftest import IMAGE_URI, ROLE, Launch

REPOSITORY = IMAGE_URI.split("/", 1)[1].split(":")[0]
TAG = IMAGE_URI.rsplit(":", 1)[1]
BUCKET = "doctor-bucket"

DOCKER_V2 = {
    "schemaVersion": 2,
    "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
    "config": {
        "mediaType": "application/vnd.docker.container.image.v1+json",
        "size": 7023,
        "digest": "sha256:" + "c" * 64,
    },
    "layers": [
        {
            "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
            "size": 32654,
            "digest": "sha256:" + "d" * 64,
        }
    ],
}
OCI_INDEX = {
    # What BuildKit pushes when it attaches a provenance attestation to a one-platform build.
    "schemaVersion": 2,
    "mediaType": "application/vnd.oci.image.index.v1+json",
    "manifests": [
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 1000,
            "digest": "sha256:" + "e" * 64,
            "platform": {"architecture": "amd64", "os": "linux"},
        },
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "size": 500,
            "digest": "sha256:" + "f" * 64,
            "platform": {"architecture": "unknown", "os": "unknown"},
        },
    ],
}


def set_up(
    launch: Launch,
    *,
    role: bool = True,
    trusted: str = "sagemaker.amazonaws.com",
    bucket_region: str | None = "us-east-1",
    manifest: dict[str, Any] | None = DOCKER_V2,
) -> None:
    """An account as a user would have made it: the role, the bucket and the pushed image."""
    if role:
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"Service": trusted}, "Action": "sts:AssumeRole"}
            ],
        }
        launch.client("iam").create_role(
            RoleName=ROLE.rsplit("/", 1)[1], AssumeRolePolicyDocument=json.dumps(trust)
        )
    if bucket_region == "us-east-1":
        launch.client("s3").create_bucket(Bucket=BUCKET)
    elif bucket_region:
        launch.client("s3").create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": bucket_region}
        )
    if manifest is not None:
        ecr = launch.client("ecr")
        ecr.create_repository(repositoryName=REPOSITORY)
        ecr.put_image(repositoryName=REPOSITORY, imageManifest=json.dumps(manifest), imageTag=TAG)


def table(stdout: str) -> dict[str, tuple[str, str]]:
    """The doctor's table: check -> (result, what to do), wrapped lines joined."""
    header, rule, *lines = stdout.splitlines()
    result_at, todo_at = header.index("result"), header.index("what to do")
    assert set(rule) == {"-", " "}
    rows: dict[str, tuple[str, str]] = {}
    check = ""
    for line in lines:
        if line[:result_at].strip():
            check = line[:result_at].strip()
            rows[check] = (line[result_at:todo_at].strip(), line[todo_at:].strip())
        else:  # the last column, wrapped
            result, todo = rows[check]
            rows[check] = (result, f"{todo} {line.strip()}")
    return rows


def doctor(launch: Launch, *args: str) -> tuple[int, dict[str, tuple[str, str]]]:
    done = launch("doctor", "--bucket", BUCKET, *args)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.returncode, table(done.stdout)


def test_a_healthy_account_passes(launch: Launch) -> None:
    set_up(launch)
    status, rows = doctor(launch)
    assert status == 0, rows
    assert {result for result, _ in rows.values()} <= {"ok", "could not check"}
    for check in ("region", "credentials", "execution role", "role trusts SageMaker"):
        assert rows[check][0] == "ok", rows
    assert rows["bucket in region"] == ("ok", f"{BUCKET} in us-east-1")
    assert rows["image in ECR"][0] == "ok"
    # moto answers neither the policy simulator, ECR's layer downloads nor Service Quotas.
    assert "ml.g4dn.xlarge for training job usage" in rows["training quota"][1]
    assert "ml.g4dn.xlarge for endpoint usage" in rows["hosting quota"][1]
    # The image's CUDA label is unreadable in moto: the Dockerfile's default is assumed.
    result, todo = rows["hosting GPU driver"]
    assert result == "ok"
    assert "ml.g4dn.xlarge (T4) would get driver 470 (CUDA 11.4) by default" in todo
    assert "InferenceAmiVersion=al2-ami-sagemaker-inference-gpu-2 (driver 535)" in todo
    assert "CUDA 12.6 assumed (the Dockerfile's default)" in todo
    assert "started once more without" in rows["--debugger auto"][1]


def fails(rows: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {check: todo for check, (result, todo) in rows.items() if result == "FAIL"}


def test_what_is_missing_fails_its_row(launch: Launch) -> None:
    """No role, no bucket, no image: three rows fail, each saying what to create."""
    set_up(launch, role=False, bucket_region=None, manifest=None)
    status, rows = doctor(launch)
    assert status == 1
    failed = fails(rows)
    assert list(failed) == ["execution role", "bucket", "image in ECR"], rows
    assert "no role SageMakerRole in account 123456789012: create one" in failed["execution role"]
    assert f"no bucket {BUCKET}: create it (aws s3 mb s3://{BUCKET}" in failed["bucket"]
    assert f"no repository {REPOSITORY}: rebuild and push" in failed["image in ECR"]


def test_what_sagemaker_refuses_fails_its_row(launch: Launch) -> None:
    """A role SageMaker may not assume, a bucket in another region, an image pushed as an OCI
    index, and a GPU host (K80) that no driver for the image's CUDA runs on."""
    set_up(launch, trusted="ec2.amazonaws.com", bucket_region="eu-west-1", manifest=OCI_INDEX)
    status, rows = doctor(launch, "--hosting-instance-type", "ml.p2.xlarge")
    assert status == 1
    failed = fails(rows)
    assert list(failed) == [
        "role trusts SageMaker",
        "bucket in region",
        "image in ECR",
        "hosting GPU driver",
    ], rows
    assert '"Principal": {"Service": "sagemaker.amazonaws.com"}' in failed["role trusts SageMaker"]
    assert f"{BUCKET} is in eu-west-1, the jobs in us-east-1" in failed["bucket in region"]
    assert (
        "application/vnd.oci.image.index.v1+json (linux/amd64, unknown/unknown): SageMaker "
        "accepts only a Docker v2 one; rebuild and push with ./push_to_ecr.sh (docker build "
        "--provenance=false"
    ) in failed["image in ECR"]
    assert "no AMI runs this image's CUDA 12.6" in failed["hosting GPU driver"]


def test_settings_come_from_the_other_commands_tables(launch: Launch) -> None:
    """What doctor checks is what `launch train` and `launch deploy` would ask for."""
    (launch.cwd / "launch.toml").write_text(
        '[train]\ninstance_type = "ml.m5.xlarge"\ndebugger = "off"\n\n'
        '[deploy]\ninstance_type = "ml.c5.xlarge"\n'
    )
    set_up(launch)
    status, rows = doctor(launch, "--training-instance-type", "ml.g5.xlarge")
    assert status == 0, rows
    assert "'ml.g5.xlarge for training job usage'" in rows["training quota"][1], "flag wins"
    assert "'ml.c5.xlarge for endpoint usage'" in rows["hosting quota"][1]
    assert rows["hosting GPU driver"] == ("ok", "ml.c5.xlarge has no NVIDIA GPU: no GPU AMI needed")
    assert rows["--debugger off"][0] == "ok"
