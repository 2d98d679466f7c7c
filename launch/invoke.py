"""`launch invoke`: send images to an endpoint (or a local container) and print the top classes.

`--endpoint` goes through SageMaker Runtime's InvokeEndpoint; `--url` POSTs the same request to a
container's /invocations (`docker run -p 8080:8080 IMAGE serve`), which is also how to try it where
no endpoint can answer: moto cannot invoke an endpoint with a binary body. `--target-model` names
the model of a multi-model endpoint a request is for (InvokeEndpoint's TargetModel, which reaches
the container as a header; `--url` sends that header itself). `--async` sends each file to an
asynchronous endpoint through S3 and waits for its answer there (launch.asynchronous).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from botocore.config import Config
from botocore.exceptions import ClientError

from container.invocations import CUSTOM_ATTRIBUTES, SUFFIX_MEDIA_TYPES, TARGET_MODEL
from launch import asynchronous
from launch.aws import Aws
from launch.errors import LaunchError, explain
from launch.multi_model import check_name
from launch.settings import Common

__all__ = [
    "HELP",
    "Answer",
    "Endpoint",
    "Url",
    "add_arguments",
    "format_answer",
    "format_predictions",
    "image_files",
    "media_type",
    "run",
]

logger = logging.getLogger(__name__)

HELP = "send images to an endpoint (or a local container) and print the top-k classes"


@dataclass(frozen=True)
class Answer:
    """What the endpoint or the server answered one image with."""

    status: int
    body: bytes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("images", nargs="+", type=Path, help="image files, or folders of them")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--endpoint", help="a SageMaker endpoint's name (launch deploy's)")
    target.add_argument("--url", help="a local container, e.g. http://localhost:8080")
    parser.add_argument(
        "--top-k", type=int, default=3, help="classes per image (default: %(default)s)"
    )
    parser.add_argument(
        "--custom-attributes",
        default="",
        help=f"more {CUSTOM_ATTRIBUTES}, e.g. min_confidence=0.5 or abstain=off "
        "(top_k comes from --top-k)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds per request (default: %(default)s)"
    )
    parser.add_argument(
        "--target-model",
        metavar="NAME.tar.gz",
        help="the model of a multi-model endpoint to ask (launch add-model printed its name)",
    )
    group = parser.add_argument_group("asynchronous endpoint (deploy --async)")
    group.add_argument(
        "--async",
        dest="asynchronous",
        action="store_true",
        help="upload each file to s3://BUCKET/PREFIX/async/input/, InvokeEndpointAsync, and wait "
        "for its result in S3",
    )
    group.add_argument(
        "--wait",
        type=float,
        default=600,
        metavar="SECONDS",
        help="how long to wait for all the results (default: %(default)s; an endpoint at zero "
        "instances takes minutes to start one)",
    )
    group.add_argument(
        "--invocation-timeout",
        type=int,
        metavar="SECONDS",
        help=f"InvocationTimeoutSeconds, 1-{asynchronous.MAX_TIMEOUT_S}: how long the endpoint "
        "may work on one request (SageMaker's default: 15 min)",
    )


def _images(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += image_files(path)
        elif path.is_file():
            found.append(path)
        else:
            raise LaunchError(f"{path} does not exist")
    if not found:
        raise LaunchError(
            f"no images ({', '.join(SUFFIX_MEDIA_TYPES)}) in {', '.join(map(str, paths))}"
        )
    return found


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively, by suffix), sorted."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIX_MEDIA_TYPES
    )


def media_type(path: Path) -> str:
    """What an image file is sent as: by its suffix, else as a JPEG (the server sniffs it)."""
    return SUFFIX_MEDIA_TYPES.get(path.suffix.lower(), "image/jpeg")


def _is_moto(exc: ClientError, endpoint_url: str) -> bool:
    """moto answers InvokeEndpoint with a binary body by an HTML 500 of its own."""
    error = exc.response.get("Error", {})
    not_aws = "amazonaws.com" not in endpoint_url
    return not_aws and str(error.get("Code")) == "500" and "<html" in str(error.get("Message"))


def format_answer(name: str, body: dict[str, Any]) -> tuple[str, int]:
    """What the server answered for one input: a table, or for a multi-image answer (`results`)
    a table per image and a line per image it could not answer; and how many it could not."""
    results = body.get("results")
    if results is None:
        return format_predictions(name, body), 0
    blocks = []
    failed = 0
    for record in results:
        member = f"{name}: {record.get('image')}"
        if "predictions" in record:
            blocks.append(
                format_predictions(member, {**record, "model_version": body.get("model_version")})
            )
        else:
            failed += 1
            blocks.append(f"{member}: failed ({record.get('error')}): {record.get('message')}")
    return "\n".join(blocks), failed


def format_predictions(name: str, body: dict[str, Any]) -> str:
    """A table of one image's classes as the server ranked them, and, when the model declined
    to name one, why."""
    rows = body.get("predictions", [])
    width = max([len("label"), *(len(str(p.get("label"))) for p in rows)])
    version = body.get("model_version")
    lines = [f"{name}" + (f"  (model {version})" if version else "")]
    lines.append(f"  {'rank':>4}  {'label':<{width}}  {'index':>5}  probability")
    for rank, p in enumerate(rows, 1):
        label = str(p.get("label"))
        lines.append(f"  {rank:>4}  {label:<{width}}  {p.get('index'):>5}  {p['probability']:.4f}")
    if body.get("abstained"):
        lines.append(f"  abstained, not sure it is any of these: {body.get('reason')}")
    return "\n".join(lines)


class Endpoint:
    """A SageMaker endpoint, through SageMaker Runtime's InvokeEndpoint."""

    def __init__(
        self, aws: Aws, name: str, timeout: float, target_model: str | None = None
    ) -> None:
        config = Config(read_timeout=timeout, retries={"mode": "standard", "max_attempts": 1})
        self._client = aws.boto.client("sagemaker-runtime", config=config)
        self._name = name
        self._target = {} if target_model is None else {"TargetModel": target_model}

    def send(self, body: bytes, content_type: str, attributes: str) -> Answer:
        try:
            answer = self._client.invoke_endpoint(
                EndpointName=self._name,
                Body=body,
                ContentType=content_type,
                Accept="application/json",
                CustomAttributes=attributes,
                **self._target,
            )
        except ClientError as exc:
            if _is_moto(exc, self._client.meta.endpoint_url):
                raise LaunchError(
                    f"moto cannot invoke endpoints ({self._client.meta.endpoint_url} answered "
                    "InvokeEndpoint with an HTML 500); use --url against a local container"
                ) from exc
            raise
        return Answer(200, answer["Body"].read())

    def close(self) -> None:
        self._client.close()


class Url:
    """A container's /invocations, e.g. `docker run -p 8080:8080 IMAGE serve`."""

    def __init__(self, url: str, timeout: float, target_model: str | None = None) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        # What SageMaker adds to each request to a multi-model endpoint's container.
        self._target = {} if target_model is None else {TARGET_MODEL: target_model}

    def send(self, body: bytes, content_type: str, attributes: str) -> Answer:
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            CUSTOM_ATTRIBUTES: attributes,
            **self._target,
        }
        try:
            response = self._client.post("/invocations", content=body, headers=headers)
        except httpx.TransportError as exc:
            raise LaunchError(
                f"cannot reach {self._client.base_url}: {exc} (is the server running?)"
            ) from exc
        return Answer(response.status_code, response.content)

    def close(self) -> None:
        self._client.close()


def _check(args: argparse.Namespace) -> None:
    if args.target_model is not None:
        check_name(args.target_model, "--target-model")
    if not args.asynchronous:
        return
    if args.endpoint is None:
        raise LaunchError(
            "--async needs --endpoint: an asynchronous endpoint reads its input in S3"
        )
    if args.target_model is not None:
        raise LaunchError(
            "--target-model with --async: InvokeEndpointAsync takes no TargetModel (an "
            "asynchronous endpoint serves one model)"
        )
    if (
        args.invocation_timeout is not None
        and not 1 <= args.invocation_timeout <= asynchronous.MAX_TIMEOUT_S
    ):
        raise LaunchError(
            f"--invocation-timeout {args.invocation_timeout}: use 1 to {asynchronous.MAX_TIMEOUT_S}"
        )
    if args.wait < 0:
        raise LaunchError(f"--wait {args.wait}: use 0 or more seconds")


def _print_answer(path: Path, answer: Answer) -> bool:
    """The answer's tables, or what went wrong; whether every image of it was answered."""
    if answer.status != 200:
        print(f"{path}: HTTP {answer.status}: {answer.body.decode(errors='replace')}")
        return False
    try:
        body = json.loads(answer.body)
    except ValueError:
        print(f"{path}: not a JSON answer: {answer.body[:200].decode(errors='replace')!r}")
        return False
    text, failed = format_answer(str(path), body)
    print(text)
    return failed == 0


def _run_async(
    args: argparse.Namespace, common: Common, images: list[Path], attributes: str
) -> int:
    """Every file queued first, so that the endpoint works on them together; then each answer
    as it comes, in order, all within --wait."""
    aws = Aws.connect(common)
    runtime = aws.boto.client("sagemaker-runtime")
    s3 = aws.boto.client("s3")
    prefix = asynchronous.layout(aws).input
    queued: list[tuple[Path, asynchronous.Locations]] = []
    for path in images:
        kind = media_type(path)
        uri = asynchronous.upload(aws, path, prefix, kind)
        where = asynchronous.submit(
            runtime, args.endpoint, uri, kind, attributes, args.invocation_timeout
        )
        logger.info("%s -> %s: answer to come at %s", path, uri, where.output)
        queued.append((path, where))
    deadline = time.monotonic() + args.wait
    failed = 0
    for path, where in queued:
        result = asynchronous.wait_for(s3, where, deadline)
        if result is None:
            print(
                f"{path}: no answer within {args.wait:g} s; it may still be queued or running "
                f"(an endpoint at zero instances takes minutes to start one): it will be at "
                f"{where.output}" + (f", or a failure at {where.failure}" if where.failure else "")
            )
            failed += 1
        elif not result.ok:
            print(f"{path}: failed: {result.body.decode(errors='replace').strip()}")
            failed += 1
        elif not _print_answer(path, Answer(200, result.body)):
            failed += 1
    if failed:
        print(f"{failed} of {len(images)} images failed")
    return 1 if failed else 0


def run(args: argparse.Namespace, common: Common) -> int:
    _check(args)
    images = _images(args.images)
    attributes = ", ".join(a for a in (f"top_k={args.top_k}", args.custom_attributes) if a)
    if args.asynchronous:
        return _run_async(args, common, images, attributes)
    target: Endpoint | Url = (
        Endpoint(Aws.connect(common), args.endpoint, args.timeout, args.target_model)
        if args.endpoint
        else Url(args.url, args.timeout, args.target_model)
    )
    failed = 0
    with closing(target):
        for path in images:
            try:
                answer = target.send(path.read_bytes(), media_type(path), attributes)
            except ClientError as exc:  # ModelError and friends: this image, not the whole run
                print(f"{path}: {explain(exc)}")
                failed += 1
                continue
            if not _print_answer(path, answer):
                failed += 1
    if failed:
        print(f"{failed} of {len(images)} images failed")
    return 1 if failed else 0
