"""Settings from one config file and the command line: flags win over the file, the file over the
defaults. The file is TOML: the common settings at the top, each command's under its name.

    region = "eu-west-1"
    role = "arn:aws:iam::123456789012:role/SageMakerRole"
    image_uri = "123456789012.dkr.ecr.eu-west-1.amazonaws.com/sagemaker-dog-classifier:v1"

    [tune]
    max_jobs = 20
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from launch.errors import LaunchError

__all__ = ["DEFAULT_CONFIG", "Common", "add_wait_argument", "load_config"]

DEFAULT_CONFIG = Path("launch.toml")
"""Read when present and no --config is given."""


class Common(BaseModel):
    """What every command needs; `launch --help` lists them as flags."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    region: str | None = Field(None, description="AWS region (default: the AWS CLI's)")
    role: str | None = Field(
        None, description="SageMaker execution role ARN (jobs, models and endpoints run as it)"
    )
    image_uri: str | None = Field(
        None, description="the image in ECR, as ./push_to_ecr.sh prints it"
    )
    bucket: str | None = Field(
        None, description="S3 bucket for data and artifacts (default: SageMaker's default bucket)"
    )
    prefix: str = Field("dog-classifier", description="S3 key prefix and job name prefix")

    def need(self, name: str) -> str:
        """A setting a command cannot go without; a LaunchError that says where to put it."""
        value = getattr(self, name)
        if not value:
            flag = "--" + name.replace("_", "-")
            raise LaunchError(f"no {name} given: pass {flag}, or set {name} in {DEFAULT_CONFIG}")
        return str(value)


def add_wait_argument(
    parser: argparse._ActionsContainer,  # a parser, or one of its argument groups
    until: str,
    default: bool = True,
) -> None:
    """--wait/--no-wait: whether a command that starts something on SageMaker waits `until`."""
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=default,
        help=f"wait {until} (default: {'wait' if default else 'no'})",
    )


def load_config(path: Path | None) -> dict[str, Any]:
    """The config file's tables; {} when there is none (and none was asked for)."""
    if path is None:
        if not DEFAULT_CONFIG.is_file():
            return {}
        path = DEFAULT_CONFIG
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError as exc:
        raise LaunchError(f"config file {path} does not exist") from exc
    except tomllib.TOMLDecodeError as exc:
        raise LaunchError(f"config file {path} is not valid TOML: {exc}") from exc
