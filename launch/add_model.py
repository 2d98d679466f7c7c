"""`launch add-model`: put a model.tar.gz where a multi-model endpoint finds it.

A multi-model endpoint serves every NAME.tar.gz under its S3 prefix, loading one on the first
request that names it (launch.multi_model). Adding a model is copying it there: from a local file
(the managed upload, multipart for big ones) or from S3 (the managed copy, no download). The prefix
comes from `--model-data-prefix`, or from the endpoint's model (`--endpoint`). An existing NAME is
never overwritten: instances that have loaded it would go on serving the old one, so a new
version gets a new name.
"""

from __future__ import annotations

import argparse
from pathlib import Path, PurePosixPath
from typing import Any

from botocore.exceptions import ClientError

from launch.aws import Aws
from launch.errors import LaunchError
from launch.multi_model import check_name, endpoint_prefix, normalise_prefix
from launch.settings import Common

__all__ = ["HELP", "add_arguments", "run"]

HELP = "add a model.tar.gz to a multi-model endpoint (copy it under the endpoint's S3 prefix)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local model.tar.gz, or its s3:// URI")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", help="a multi-model endpoint (launch deploy --multi-model)")
    where.add_argument(
        "--model-data-prefix",
        metavar="S3_PREFIX",
        help="the endpoint's model prefix, as given to launch deploy --multi-model",
    )
    parser.add_argument(
        "--name",
        metavar="NAME.tar.gz",
        help="its name under the prefix, what invoke --target-model names (default: the file's "
        "own name)",
    )


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def _status(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _refuse_existing(s3: Any, target: str) -> None:
    bucket, key = _split(target)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if _status(exc) in ("404", "NoSuchKey"):
            return
        raise
    raise LaunchError(
        f"{target} exists: an endpoint that has loaded it would go on serving the old one; add "
        "this one under a new --name (e.g. with a version in it)"
    )


def run(args: argparse.Namespace, common: Common) -> int:
    source: str = args.model
    from_s3 = source.startswith("s3://")
    name = check_name(args.name or PurePosixPath(source).name, "--name")
    if not from_s3 and not Path(source).is_file():
        raise LaunchError(f"{source} is not a file: give a model.tar.gz, or its s3:// URI")
    aws = Aws.connect(common)
    prefix = (
        endpoint_prefix(aws, args.endpoint)
        if args.endpoint
        else normalise_prefix(args.model_data_prefix, "--model-data-prefix")
    )
    target = prefix + name
    s3 = aws.boto.client("s3")
    _refuse_existing(s3, target)
    bucket, key = _split(target)
    if from_s3:
        from_bucket, from_key = _split(source)
        try:
            s3.copy({"Bucket": from_bucket, "Key": from_key}, bucket, key)
        except ClientError as exc:
            if _status(exc) not in ("404", "NoSuchKey", "NoSuchBucket"):
                raise
            raise LaunchError(
                f"no object at {source}: give the s3:// URI of a model.tar.gz"
            ) from exc
    else:
        s3.upload_file(source, bucket, key)
    print(f"added:        {source} -> {target}")
    print(f"target model: {name}")
    endpoint = args.endpoint or "ENDPOINT"
    print(f"invoke:       launch invoke IMAGES --endpoint {endpoint} --target-model {name}")
    return 0
