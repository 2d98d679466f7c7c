"""`launch transform`: a batch transform over an S3 prefix of images, then its results and accuracy.

One S3 object is one request (SplitType None, image/jpeg in, application/json out, SingleRecord, as
the container's /execution-parameters also says); SageMaker writes `<input key>.out` under the
output path. The outputs are fetched to a local folder, and when the inputs sit in class folders
(`.../001.Affenpinscher/x.jpg`, as `upload-data` lays out the test channel) each top-1 label is
compared with its folder's class, named as `train` names it (container.class_names).

On a GPU instance type the job names the TransformAmiVersion whose driver runs the image's CUDA
(launch.image says why; an image built for CUDA 13 has none, so it is refused), and a model made
from --model-data serves with SERVE_DEVICE=cuda. A model given by --model keeps its environment.

With `--instance-type local` the same job runs in the local docker engine through the SDK's local
mode, on a local folder and a local model.tar.gz (or model folder). Local mode sends only the files
directly in its input folder, so the inputs, class folders and all, are staged as one flat folder of
links and their outputs put back under the same relative paths. Unlike SageMaker, local mode writes
an error response into the `.out` file and goes on; such outputs are counted as not predictions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from sagemaker.exceptions import UnexpectedStatusException
from sagemaker.model import Model
from sagemaker.session import Session
from sagemaker.transformer import Transformer
from tqdm import tqdm  # type: ignore[import-untyped]

from container.class_names import class_name
from container.invocations import MAX_IN_FLIGHT_MB, MAX_PAYLOAD_MB
from launch import local_mode
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError
from launch.image import BATCH, SERVE_DEVICE, add_host_arguments, image_cuda, plan_host
from launch.settings import Common, add_wait_argument

__all__ = ["HELP", "Outcome", "add_arguments", "run", "score"]

HELP = (
    "batch transform an S3 prefix of images (or, with --instance-type local, a local folder in the "
    "local docker engine), fetch the .out files and report the accuracy"
)

CONTENT_TYPE = "image/jpeg"
ACCEPT = "application/json"


@dataclass(frozen=True)
class Outcome:
    """One input's result: its key below the input prefix, the true class (None outside class
    folders), the top-1 label (None when the .out is not a prediction) and whether the model
    abstained (declined to answer: none of its classes, it judged)."""

    relative: str
    truth: str | None
    predicted: str | None
    abstained: bool = False


@dataclass(frozen=True)
class Results:
    """An ended job: its inputs (paths below its input prefix or folder) and, in `folder`, the
    `.out` file of each of `outputs` at the same path plus `.out`."""

    name: str
    status: str
    reason: str
    source: str
    inputs: list[str]
    outputs: list[str]
    folder: Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input",
        help="S3 prefix of the images (default: the test channel upload-data wrote, "
        "s3://BUCKET/PREFIX/data/test/); with --instance-type local, a local folder",
    )
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--model", help="a SageMaker model's name (launch deploy creates one)")
    model.add_argument(
        "--model-data",
        help="s3://.../model.tar.gz: create a model of it with the image and role; with "
        "--instance-type local, a local model.tar.gz or model folder",
    )
    model.add_argument(
        "--fetch-only",
        metavar="JOB",
        help="start nothing: fetch and score the outputs of this transform job",
    )
    parser.add_argument(
        "--output", help="S3 output path (default: s3://BUCKET/PREFIX/transform/JOB)"
    )
    parser.add_argument(
        "--instance-type",
        default="ml.m5.xlarge",
        help="default: %(default)s; local or local_gpu runs the job in the local docker engine "
        "(the SDK's local mode: --image-uri a local image, no AWS account needed)",
    )
    parser.add_argument("--instance-count", type=int, default=1, help="default: %(default)s")
    parser.add_argument(
        "--max-concurrent-transforms",
        type=int,
        help=f"requests in flight per instance (default: the container's /execution-parameters; "
        f"times {MAX_PAYLOAD_MB} MB must stay within {MAX_IN_FLIGHT_MB})",
    )
    add_host_arguments(parser, BATCH)
    parser.add_argument(
        "--invocations-timeout", type=int, default=600, help="seconds per image (default: 600)"
    )
    add_wait_argument(parser, "for the job, then fetch and score")
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
    """Put TransformAmiVersion into CreateTransformJob, which the SDK v2 Transformer has no
    argument for, through botocore's documented hook for a request's parameters."""

    def add(params: dict[str, Any], **kwargs: Any) -> None:
        params["TransformResources"]["TransformAmiVersion"] = version

    client = aws.sagemaker.sagemaker_client
    client.meta.events.register("provide-client-params.sagemaker.CreateTransformJob", add)


def _create_model(
    args: argparse.Namespace,
    common: Common,
    session: Session,
    model_data: str,
    role: str,
    env: dict[str, Any] | None = None,
) -> str:
    """A SageMaker model of the image and `model_data`; its name."""
    model = Model(
        image_uri=common.need("image_uri"),
        model_data=model_data,
        role=role,
        env=env,
        name=job_name(common.prefix, "model"),
        sagemaker_session=session,
    )
    model.create(instance_type=args.instance_type)
    print(f"model {model.name} created from {args.model_data}")
    return str(model.name)


def _transform(
    args: argparse.Namespace, session: Session, model_name: str, source: str, output: str, name: str
) -> Transformer:
    """Start the job: one image per request, JSON back."""
    transformer = Transformer(
        model_name=model_name,
        instance_count=args.instance_count,
        instance_type=args.instance_type,
        strategy="SingleRecord",
        output_path=output,
        accept=ACCEPT,
        max_concurrent_transforms=args.max_concurrent_transforms,
        max_payload=MAX_PAYLOAD_MB,
        sagemaker_session=session,
    )
    transformer.transform(
        source,
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
    return transformer


def _image(args: argparse.Namespace, common: Common, aws: Aws) -> str:
    """The image the job will run: the settings' for --model-data, the model's own for --model."""
    if args.model_data:
        return common.need("image_uri")
    model = aws.sagemaker.sagemaker_client.describe_model(ModelName=args.model)
    container = model.get("PrimaryContainer") or model["Containers"][0]
    return str(container["Image"])


def _start(args: argparse.Namespace, common: Common, aws: Aws) -> str:
    """Create the transform job on SageMaker (and the model, with --model-data); its name."""
    name = job_name(common.prefix, "transform")
    concurrent = args.max_concurrent_transforms
    most = MAX_IN_FLIGHT_MB // MAX_PAYLOAD_MB
    if concurrent is not None and not 1 <= concurrent <= most:
        raise LaunchError(
            f"--max-concurrent-transforms {concurrent}: SageMaker wants it times MaxPayloadInMB "
            f"({MAX_PAYLOAD_MB}) within {MAX_IN_FLIGHT_MB}, so 1 to {most}"
        )
    if not (args.model_data or args.model):
        raise LaunchError("no model: pass --model NAME (launch deploy's) or --model-data s3://...")
    plan = plan_host(
        args.instance_type,
        args.transform_ami_version,
        BATCH,
        lambda: image_cuda(_image(args, common, aws), aws.boto, args.image_cuda),
    )
    if args.model_data:
        role = common.need("role")
        # A host whose driver cannot run the image then fails the job at once.
        env = {SERVE_DEVICE: "cuda"} if plan.serve_on_gpu else None
        model_name = _create_model(args, common, aws.sagemaker, args.model_data, role, env)
    else:
        model_name = args.model
    if plan.ami:
        _ami_version(aws, plan.ami)
    source = args.input or aws.s3_uri("data", "test") + "/"
    output = args.output or aws.s3_uri("transform", name)
    transformer = _transform(args, aws.sagemaker, model_name, source, output, name)
    print(f"transform job {name} started: {console_url(aws.region, 'transform-jobs', name)}")
    if args.wait:
        # Logs off: following them polls CloudWatch, which adds nothing to the job's own status.
        # A failed job still has the outputs of the images that worked: report them.
        with suppress(UnexpectedStatusException):
            transformer.wait(logs=False)
    return name


def _local_path(value: str | None, flag: str) -> Path:
    if not value:
        raise LaunchError(f"--instance-type local needs {flag} with a local path")
    path = Path(value.removeprefix("file://")).expanduser()
    if not path.exists():
        raise LaunchError(f"{flag} {value}: there is no such file or folder")
    return path.resolve()


def _run_locally(args: argparse.Namespace, common: Common) -> Results:
    """The job in the local docker engine, through the SDK's local mode; its outputs in place."""
    if args.model or args.fetch_only:
        raise LaunchError(
            "--instance-type local runs a local model: pass --model-data PATH "
            "(a model.tar.gz or model folder), not --model or --fetch-only"
        )
    if not args.wait:
        raise LaunchError("--instance-type local runs the job in this process: drop --no-wait")
    model_data = _local_path(args.model_data, "--model-data")
    source = _local_path(args.input, "--input")
    if not source.is_dir():
        raise LaunchError(f"--input {args.input} is not a folder")
    inputs = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
    if not inputs:
        raise LaunchError(f"--input {args.input} holds no files")
    name = job_name(common.prefix, "transform")
    folder = args.download or Path("transform-output") / name
    image = common.need("image_uri")
    with (
        local_mode.session(image, common.region) as session,
        tempfile.TemporaryDirectory(prefix="launch-transform-") as tmp,
    ):
        staged, output = Path(tmp, "in"), Path(tmp, "out")
        staged.mkdir()
        for index, relative in enumerate(inputs):
            (staged / f"{index:06d}").symlink_to(source / relative)
        role = common.role or local_mode.ROLE
        model_name = _create_model(args, common, session, f"file://{model_data}", role)
        print(f"transform job {name}: {len(inputs)} files from {source} in the local engine")
        try:
            _transform(args, session, model_name, f"file://{staged}", f"file://{output}", name)
        except RuntimeError as exc:  # the SDK's local mode gave up waiting for a 200 /ping
            raise LaunchError(
                f"local transform job {name}: the container never became healthy ({exc}); "
                "its log above says why"
            ) from exc
        outputs = []
        for index, relative in enumerate(inputs):
            done = output / f"{index:06d}.out"
            if done.is_file():
                target = folder / f"{relative}.out"
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(done, target)
                outputs.append(relative)
        job = session.sagemaker_client.describe_transform_job(name)
    return Results(name, job["TransformJobStatus"], "", str(source), inputs, outputs, folder)


def _outcome(relative: str, body: bytes) -> Outcome:
    try:
        answer = json.loads(body)
        top1 = str(answer["predictions"][0]["label"])
    except (ValueError, KeyError, IndexError, TypeError):
        return Outcome(relative, _truth(relative), None)
    return Outcome(relative, _truth(relative), top1, answer.get("abstained") is True)


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


def _collect(aws: Aws, name: str, download: Path | None) -> Results:
    """A SageMaker job's inputs and outputs, the outputs fetched from S3."""
    job = aws.sagemaker.sagemaker_client.describe_transform_job(TransformJobName=name)
    status = job["TransformJobStatus"]
    if status in ("InProgress", "Stopping"):
        raise LaunchError(f"transform job {name} is {status}: run again with --fetch-only {name}")
    input_uri = job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"]
    output_uri = job["TransformOutput"]["S3OutputPath"]
    inputs = _list(aws, input_uri)
    outputs = {k.removesuffix(".out"): v for k, v in _list(aws, output_uri).items()}
    outputs = {k: v for k, v in outputs.items() if k}
    folder = download or Path("transform-output") / name
    if outputs:
        _fetch(aws, {k + ".out": v for k, v in outputs.items()}, _split(output_uri)[0], folder)
    reason = str(job.get("FailureReason", ""))
    return Results(name, status, reason, input_uri, sorted(inputs), sorted(outputs), folder)


def _percent(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else "-"


def score(outcomes: list[Outcome]) -> str:
    """Per class and overall: images, correct top-1, accuracy, then the answered images (the
    model did not abstain): coverage and accuracy on them. '' when no input had a class folder."""
    known = [o for o in outcomes if o.truth is not None]
    if not known:
        return ""
    by_class: dict[str, list[Outcome]] = {}
    for outcome in known:
        by_class.setdefault(str(outcome.truth), []).append(outcome)
    width = max(len("class"), *(len(c) for c in by_class))
    header = ("images", "correct", "accuracy", "answered", "coverage", "accuracy answered")
    widths = [max(8, len(h)) for h in header]
    lines = [
        f"{'class':<{width}}  "
        + "  ".join(f"{h:>{w}}" for h, w in zip(header, widths, strict=True))
    ]
    for truth, rows in [*sorted(by_class.items()), ("all", known)]:
        correct = [o for o in rows if o.predicted == o.truth]
        answered = [o for o in rows if not o.abstained]
        right = sum(o.predicted == o.truth for o in answered)
        cells = (
            str(len(rows)),
            str(len(correct)),
            _percent(len(correct), len(rows)),
            str(len(answered)),
            _percent(len(answered), len(rows)),
            _percent(right, len(answered)),
        )
        lines.append(
            f"{truth:<{width}}  "
            + "  ".join(f"{c:>{w}}" for c, w in zip(cells, widths, strict=True))
        )
    return "\n".join(lines)


def _report(results: Results) -> int:
    print(f"transform job {results.name}: {results.status} {results.reason}".rstrip())
    folder, outputs, inputs = results.folder, results.outputs, results.inputs
    print(f"{len(outputs)} outputs in {folder}/ ({len(inputs)} inputs in {results.source})")
    missing = sorted(set(inputs) - set(outputs))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        print(f"{len(missing)} inputs have no output (failed or not sent): {shown}")
    outcomes = [_outcome(r, (folder / f"{r}.out").read_bytes()) for r in outputs]
    unreadable = [o.relative for o in outcomes if o.predicted is None]
    if unreadable:
        print(f"{len(unreadable)} outputs are not predictions, e.g. {unreadable[0]}.out")
    abstained = [o.relative for o in outcomes if o.abstained]
    if abstained:
        print(
            f"{len(abstained)} images abstained (none of the classes, the model judged), e.g. "
            f"{abstained[0]}"
        )
    if outcomes:
        table = score(outcomes)
        print(table or "the inputs are not in class folders (NNN.Class_Name/): no accuracy")
    return 0 if results.status == "Completed" else 1


def run(args: argparse.Namespace, common: Common) -> int:
    if local_mode.is_local(args.instance_type):
        return _report(_run_locally(args, common))
    aws = Aws.connect(common)
    if args.fetch_only:
        return _report(_collect(aws, args.fetch_only, args.download))
    name = _start(args, common, aws)
    if not args.wait:
        print(f"not waiting: launch transform --fetch-only {name} fetches and scores it later")
        return 0
    return _report(_collect(aws, name, args.download))
