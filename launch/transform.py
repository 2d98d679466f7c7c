"""`launch transform`: a batch transform over an S3 prefix of images, then its results and accuracy.

One S3 object is one request (SplitType None, image/jpeg in, application/json out, SingleRecord, as
the container's /execution-parameters also says); SageMaker writes `<input key>.out` under the
output path. The outputs are fetched to a local folder, and when the inputs sit in class folders
(`.../001.Affenpinscher/x.jpg`, as `upload-data` lays out the test channel) each top-1 label is
compared with its folder's class, named as `train` names it (container.class_names).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from sagemaker.exceptions import UnexpectedStatusException
from sagemaker.model import Model
from sagemaker.transformer import Transformer
from tqdm import tqdm  # type: ignore[import-untyped]

from container.class_names import class_name
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError
from launch.settings import Common

__all__ = ["HELP", "Outcome", "add_arguments", "run", "score"]

HELP = "batch transform an S3 prefix of images, fetch the .out files and report the accuracy"

CONTENT_TYPE = "image/jpeg"
ACCEPT = "application/json"
MAX_PAYLOAD_MB = 6


@dataclass(frozen=True)
class Outcome:
    """One input's result: its key below the input prefix, the true class (None outside class
    folders) and the top-1 label (None when the .out is not a prediction)."""

    relative: str
    truth: str | None
    predicted: str | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        help="S3 prefix of the images (default: the test channel upload-data wrote, "
        "s3://BUCKET/PREFIX/data/test/)",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a SageMaker model's name (launch deploy creates one)")
    model.add_argument(
        "--model-data", help="s3://.../model.tar.gz: create a model of it with the image and role"
    )
    model.add_argument(
        "--fetch-only",
        metavar="JOB",
        help="start nothing: fetch and score the outputs of this transform job",
    )
    parser.add_argument(
        "--output", help="S3 output path (default: s3://BUCKET/PREFIX/transform/JOB)"
    )
    parser.add_argument("--instance-type", default="ml.m5.xlarge", help="default: %(default)s")
    parser.add_argument("--instance-count", type=int, default=1, help="default: %(default)s")
    parser.add_argument(
        "--max-concurrent-transforms",
        type=int,
        help=f"requests in flight per instance (default: the container's /execution-parameters; "
        f"times {MAX_PAYLOAD_MB} MB must stay within 100)",
    )
    parser.add_argument(
        "--transform-ami-version",
        help="TransformResources.TransformAmiVersion, e.g. al2-ami-sagemaker-batch-gpu-535 for "
        "a CUDA 12 image on GPU instances (the SDK v2 Transformer has no such argument: added to "
        "the CreateTransformJob request)",
    )
    parser.add_argument(
        "--invocations-timeout", type=int, default=600, help="seconds per image (default: 600)"
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the job, then fetch and score (default: wait)",
    )
    parser.add_argument(
        "--download",
        type=Path,
        help="local folder for the .out files (default: ./transform-output/JOB)",
    )


def _split(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://"):
        raise LaunchError(f"{uri} is not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _list(aws: Aws, uri: str) -> dict[str, str]:
    """Keys below an S3 prefix, by their part after it."""
    bucket, prefix = _split(uri)
    pages = (
        aws.boto.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=bucket, Prefix=prefix)
    )
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {key[len(prefix) :].lstrip("/"): key for key in keys}


def _ami_version(aws: Aws, version: str) -> None:
    """Put TransformAmiVersion into CreateTransformJob, which the SDK v2 cannot send, through
    botocore's documented hook for a request's parameters."""

    def add(params: dict[str, Any], **kwargs: Any) -> None:
        params["TransformResources"]["TransformAmiVersion"] = version

    client = aws.sagemaker.sagemaker_client
    client.meta.events.register("provide-client-params.sagemaker.CreateTransformJob", add)


def _start(args: argparse.Namespace, common: Common, aws: Aws) -> str:
    """Create the transform job (and the model, with --model-data); its name."""
    name = job_name(common.prefix, "transform")
    concurrent = args.max_concurrent_transforms
    if concurrent is not None and not 1 <= concurrent * MAX_PAYLOAD_MB <= 100:
        raise LaunchError(
            f"--max-concurrent-transforms {concurrent}: SageMaker wants it times MaxPayloadInMB "
            f"({MAX_PAYLOAD_MB}) within 100, so 1 to {100 // MAX_PAYLOAD_MB}"
        )
    if args.model_data:
        model = Model(
            image_uri=common.need("image_uri"),
            model_data=args.model_data,
            role=common.need("role"),
            name=job_name(common.prefix, "model"),
            sagemaker_session=aws.sagemaker,
        )
        model.create(instance_type=args.instance_type)
        model_name = str(model.name)
        print(f"model {model_name} created from {args.model_data}")
    elif args.model:
        model_name = args.model
    else:
        raise LaunchError("no model: pass --model NAME (launch deploy's) or --model-data s3://...")
    if args.transform_ami_version:
        _ami_version(aws, args.transform_ami_version)
    transformer = Transformer(
        model_name=model_name,
        instance_count=args.instance_count,
        instance_type=args.instance_type,
        strategy="SingleRecord",
        output_path=args.output or aws.s3_uri("transform", name),
        accept=ACCEPT,
        max_concurrent_transforms=args.max_concurrent_transforms,
        max_payload=MAX_PAYLOAD_MB,
        sagemaker_session=aws.sagemaker,
    )
    transformer.transform(
        args.input or aws.s3_uri("data", "test") + "/",
        data_type="S3Prefix",
        content_type=CONTENT_TYPE,
        split_type=None,
        job_name=name,
        model_client_config={
            "InvocationsTimeoutInSeconds": args.invocations_timeout,
            "InvocationsMaxRetries": 1,
        },
        wait=False,
        logs=False,
    )
    print(f"transform job {name} started: {console_url(aws.region, 'transform-jobs', name)}")
    if args.wait:
        # Logs off: following them polls CloudWatch, which adds nothing to the job's own status.
        # A failed job still has the outputs of the images that worked: report them.
        with suppress(UnexpectedStatusException):
            transformer.wait(logs=False)
    return name


def _top1(body: bytes) -> str | None:
    try:
        predictions = json.loads(body)["predictions"]
        return str(predictions[0]["label"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def _truth(relative: str) -> str | None:
    """The class of `.../<NNN.Class_Name>/x.jpg`; None when the key has no numbered class folder."""
    parts = PurePosixPath(relative).parts
    folder = parts[-2] if len(parts) >= 2 else ""
    name = class_name(folder)
    return name if folder and name != folder else None


def _fetch(aws: Aws, outputs: dict[str, str], bucket: str, folder: Path) -> None:
    client = aws.boto.client("s3", config=Config(max_pool_connections=16))
    with (
        tqdm(total=len(outputs), unit="file", desc="download", disable=None) as bar,
        create_transfer_manager(client, TransferConfig(max_concurrency=16)) as manager,
    ):
        futures = []
        for relative, key in outputs.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            futures.append(manager.download(bucket, key, str(target)))
        for future in futures:
            future.result()
            bar.update()


def score(outcomes: list[Outcome]) -> str:
    """Accuracy per class and overall, as a table; '' when no input had a class folder."""
    known = [o for o in outcomes if o.truth is not None]
    if not known:
        return ""
    images = Counter(o.truth for o in known)
    correct = Counter(o.truth for o in known if o.predicted == o.truth)
    width = max(len("class"), *(len(str(c)) for c in images))
    lines = [f"{'class':<{width}}  {'images':>6}  {'correct':>7}  accuracy"]
    for truth in sorted(images, key=str):
        n, k = images[truth], correct[truth]
        lines.append(f"{truth:<{width}}  {n:>6}  {k:>7}  {k / n:>8.1%}")
    n, k = len(known), sum(correct.values())
    lines.append(f"{'all':<{width}}  {n:>6}  {k:>7}  {k / n:>8.1%}")
    return "\n".join(lines)


def _report(aws: Aws, name: str, download: Path | None) -> int:
    job = aws.sagemaker.sagemaker_client.describe_transform_job(TransformJobName=name)
    status = job["TransformJobStatus"]
    if status in ("InProgress", "Stopping"):
        raise LaunchError(f"transform job {name} is {status}: run again with --fetch-only {name}")
    print(f"transform job {name}: {status} {job.get('FailureReason', '')}".rstrip())
    input_uri = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    output_uri = job["TransformOutput"]["S3OutputPath"]
    inputs = _list(aws, input_uri)
    outputs = {k.removesuffix(".out"): v for k, v in _list(aws, output_uri).items()}
    outputs = {k: v for k, v in outputs.items() if k}
    folder = download or Path("transform-output") / name
    if outputs:
        _fetch(aws, {k + ".out": v for k, v in outputs.items()}, _split(output_uri)[0], folder)
    missing = sorted(set(inputs) - set(outputs))
    print(f"{len(outputs)} outputs in {folder}/ ({len(inputs)} inputs in {input_uri})")
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"{len(missing)} inputs have no output (failed or not sent): {shown}")
    outcomes = [
        Outcome(relative, _truth(relative), _top1((folder / (relative + ".out")).read_bytes()))
        for relative in sorted(outputs)
    ]
    unreadable = [o.relative for o in outcomes if o.predicted is None]
    if unreadable:
        print(f"{len(unreadable)} outputs are not predictions, e.g. {unreadable[0]}.out")
    if outcomes:
        table = score(outcomes)
        print(table or "the inputs are not in class folders (NNN.Class_Name/): no accuracy")
    return 0 if status == "Completed" else 1


def run(args: argparse.Namespace, common: Common) -> int:
    aws = Aws.connect(common)
    if args.fetch_only:
        return _report(aws, args.fetch_only, args.download)
    name = _start(args, common, aws)
    if not args.wait:
        print(f"not waiting: launch transform --fetch-only {name} fetches and scores it later")
        return 0
    return _report(aws, name, args.download)
