"""What stops a command, said in one line with what to do: ours, and botocore's translated."""

from __future__ import annotations

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
)
from jsonschema import ValidationError as SdkConfigError  # type: ignore[import-untyped]

__all__ = ["LaunchError", "SdkConfigError", "explain", "job_ended"]


class LaunchError(Exception):
    """A problem the user can fix; the message says how."""


_CLIENT_ERRORS = {
    "ExpiredTokenException": "your AWS session expired: renew it (aws sso login, or new keys)",
    "UnrecognizedClientException": "AWS does not know these credentials: check aws configure",
    "InvalidClientTokenId": "AWS does not know these credentials: check aws configure",
    "AccessDeniedException": "access denied: the caller or the role lacks a permission",
    "AccessDenied": "access denied: the caller or the role lacks a permission",
    "ResourceLimitExceeded": "a SageMaker quota is exhausted: request an increase in Service "
    "Quotas, or use another instance type",
    "ThrottlingException": "AWS is throttling the calls: wait a minute and run again",
    "RepositoryNotFoundException": "the image's ECR repository does not exist: run "
    "./push_to_ecr.sh first",
    "ImageNotFoundException": "the image is not in ECR: run ./push_to_ecr.sh, pass its URI",
}


def explain(exc: LaunchError | BotoCoreError | ClientError | SdkConfigError) -> str:
    """One line for what stopped a command: what happened and what to do."""
    if isinstance(exc, LaunchError):
        return str(exc)
    if isinstance(exc, SdkConfigError):  # raised by the SDK as it loads its config files
        where = ".".join(map(str, exc.absolute_path)) or "the top level"
        return (
            f"a SageMaker SDK config file breaks the SDK's schema at {where}: {exc.message}; fix "
            "it in the file SAGEMAKER_USER_CONFIG_OVERRIDE names, else ~/.config/sagemaker/"
            "config.yaml, or /etc/xdg/sagemaker/config.yaml (SAGEMAKER_ADMIN_CONFIG_OVERRIDE)"
        )
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials: run 'aws configure', or set AWS_PROFILE"
    if isinstance(exc, NoRegionError):
        return "no AWS region: pass --region, or run 'aws configure set region REGION'"
    if isinstance(exc, EndpointConnectionError):
        return f"cannot reach AWS: {exc} (check the network, the region and AWS_ENDPOINT_URL)"
    if isinstance(exc, ParamValidationError):
        return f"a setting AWS rejects: {exc}".replace("\n", " ")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = str(error.get("Message", exc))
        hint = _CLIENT_ERRORS.get(code)
        lowered = message.lower()
        if code == "ValidationException" and "instance type" in lowered:
            hint = "unknown or unavailable instance type: pick one the region offers"
        elif code == "ValidationException" and "image" in lowered and "not" in lowered:
            hint = "the image is not in ECR: run ./push_to_ecr.sh and pass the URI it prints"
        detail = f"{exc.operation_name}: {code}: {message}"
        return f"{hint} ({detail})" if hint else detail
    return str(exc)


def job_ended(kind: str, name: str, status: str, reason: str | None) -> LaunchError:
    """A job that ended other than Completed (the SDK's UnexpectedStatusException), in one line."""
    why = " ".join((reason or "no FailureReason given").split())
    return LaunchError(f"{kind} job {name} ended {status}: {why}")
