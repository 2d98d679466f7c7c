"""What AWS answers becomes one line with what to do (botocore's own exception objects)."""

from __future__ import annotations

import pytest
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError

from launch.errors import LaunchError, explain


def _client_error(code: str, message: str, operation: str = "CreateTrainingJob") -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": message}}, operation)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (NoCredentialsError(), "no AWS credentials: run 'aws configure', or set AWS_PROFILE"),
        (NoRegionError(), "no AWS region: pass --region"),
        (
            _client_error("ResourceLimitExceeded", "The account-level service limit is 0"),
            "a SageMaker quota is exhausted: request an increase in Service Quotas",
        ),
        (
            _client_error("ValidationException", "Invalid value for instance type: ml.x9.huge"),
            "unknown or unavailable instance type: pick one the region offers",
        ),
        (
            _client_error("ValidationException", "Requested image 1.dkr.ecr.../dog:v9 not found."),
            "the image is not in ECR: run ./push_to_ecr.sh",
        ),
        (
            _client_error("ValidationException", "Could not find training job 'x'"),
            "CreateTrainingJob: ValidationException: Could not find training job 'x'",
        ),
        (LaunchError("no role given: pass --role"), "no role given: pass --role"),
    ],
)
def test_one_line_with_what_to_do(
    error: LaunchError | BotoCoreError | ClientError, expected: str
) -> None:
    line = explain(error)
    assert line.startswith(expected)
    assert "\n" not in line
