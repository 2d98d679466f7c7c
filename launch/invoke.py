"""`launch invoke`: send images to an endpoint (or a local container) and print the top classes.

`--endpoint` goes through SageMaker Runtime's InvokeEndpoint; `--url` POSTs the same request to a
container's /invocations (`docker run -p 8080:8080 IMAGE serve`), which is also how to try it where
no endpoint can answer: moto cannot invoke an endpoint with a binary body.
"""

from __future__ import annotations

import argparse
import json
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from botocore.config import Config
from botocore.exceptions import ClientError

from container.invocations import CUSTOM_ATTRIBUTES, SUFFIX_MEDIA_TYPES
from launch.aws import Aws
from launch.errors import LaunchError, explain
from launch.settings import Common

__all__ = [
    "HELP",
    "Answer",
    "Endpoint",
    "Url",
    "add_arguments",
    "format_predictions",
    "image_files",
    "media_type",
    "run",
]

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

    def __init__(self, aws: Aws, name: str, timeout: float) -> None:
        config = Config(read_timeout=timeout, retries={"mode": "standard", "max_attempts": 1})
        self._client = aws.boto.client("sagemaker-runtime", config=config)
        self._name = name

    def send(self, body: bytes, content_type: str, attributes: str) -> Answer:
        try:
            answer = self._client.invoke_endpoint(
                EndpointName=self._name,
                Body=body,
                ContentType=content_type,
                Accept="application/json",
                CustomAttributes=attributes,
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

    def __init__(self, url: str, timeout: float) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def send(self, body: bytes, content_type: str, attributes: str) -> Answer:
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            CUSTOM_ATTRIBUTES: attributes,
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


def run(args: argparse.Namespace, common: Common) -> int:
    images = _images(args.images)
    attributes = ", ".join(a for a in (f"top_k={args.top_k}", args.custom_attributes) if a)
    target: Endpoint | Url = (
        Endpoint(Aws.connect(common), args.endpoint, args.timeout)
        if args.endpoint
        else Url(args.url, args.timeout)
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
            if answer.status != 200:
                print(f"{path}: HTTP {answer.status}: {answer.body.decode(errors='replace')}")
                failed += 1
                continue
            print(format_predictions(str(path), json.loads(answer.body)))
    if failed:
        print(f"{failed} of {len(images)} images failed")
    return 1 if failed else 0
