"""The AWS side of every command: one boto3 session and one SageMaker session, built once from the
common settings, and the names, URIs and links the commands print."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

import boto3
import jsonschema  # type: ignore[import-untyped]
import sagemaker.config.config
import sagemaker.utils
from botocore.exceptions import NoRegionError
from sagemaker.config.config_schema import SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA
from sagemaker.session import Session

from launch.settings import Common

__all__ = ["Aws", "console_url", "job_name", "unique_stamp"]

_SDK_CONFIG = jsonschema.validators.validator_for(SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA)(
    SAGEMAKER_PYTHON_SDK_CONFIG_SCHEMA
)


def _validate_sdk_config(config: dict[str, Any] | None = None) -> None:
    """`sagemaker.config.validate_sagemaker_config`, the same error for the same config, without
    checking the SDK's own schema each time. The SDK validates its config files when a session
    loads them, and again on every value it looks up there (defaults, TelemetryOptOut), and
    `jsonschema.validate` first checks the schema against JSON Schema's meta-schema: 72 ms a
    lookup on a 2-core AMD EPYC, about 17 lookups per `launch train`, and 250 ms a file loaded."""
    error = jsonschema.exceptions.best_match(_SDK_CONFIG.iter_errors(config))
    if error is not None:
        raise error


# Where the SDK calls it: lookups (sagemaker.utils) and the loading of config files.
for _module in (sagemaker.utils, sagemaker.config.config):
    _module.validate_sagemaker_config = _validate_sdk_config  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Aws:
    """Sessions for one region, and the bucket the commands put things in."""

    boto: boto3.Session
    sagemaker: Session
    common: Common

    @classmethod
    def connect(cls, common: Common) -> Aws:
        """Sessions for the region of the settings, else the AWS CLI's (NoRegionError if none:
        the SageMaker Session would raise a bare ValueError for it)."""
        boto = boto3.Session(region_name=common.region)
        if boto.region_name is None:
            raise NoRegionError()
        session = Session(boto_session=boto, default_bucket=common.bucket)
        return cls(boto, session, common)

    @property
    def region(self) -> str:
        return str(self.boto.region_name)

    @property
    def bucket(self) -> str:
        """The settings' bucket, else SageMaker's default one (created if missing)."""
        return str(self.sagemaker.default_bucket())

    def s3_uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, self.common.prefix, *parts])


def unique_stamp(random_hex: int = 4) -> str:
    """yymmdd-HHMMSS (UTC) and `random_hex` random hex digits: the time for people to read and sort
    by, the random part so that two made in the same second (a script's deploys) differ."""
    return f"{time.strftime('%y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(random_hex // 2)}"


def job_name(prefix: str, kind: str, limit: int = 63) -> str:
    """An explicit, unique name: prefix-kind-stamp, within `limit` characters (63 for most
    SageMaker names, 32 for tuning jobs), cut from the end of the prefix so the kind stays."""
    stamp = unique_stamp()
    head = prefix[: limit - len(stamp) - len(kind) - 2].rstrip("-")
    return f"{head}-{kind}-{stamp}"


def console_url(region: str, kind: str, name: str) -> str:
    """The SageMaker console page of a job or endpoint (kind: jobs, hyper-tuning-jobs, endpoints,
    transform-jobs)."""
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/{kind}/{name}"
