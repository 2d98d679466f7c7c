"""`launch invoke`: send images to an endpoint (or a local container) and print the top classes.

`--endpoint` goes through SageMaker Runtime's InvokeEndpoint; `--url` POSTs the same request to a
container's /invocations (`docker run -p 8080:8080 IMAGE serve`), which is also how to try it where
no endpoint can answer: moto cannot invoke an endpoint with a binary body.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from botocore.config import Config
from botocore.exceptions import ClientError

from launch.aws import Aws
from launch.errors import LaunchError, explain
from launch.settings import Common

__all__ = ["HELP", "IMAGE_TYPES", "add_arguments", "format_predictions", "run"]

HELP = "send images to an endpoint (or a local container) and print the top-k classes"

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
"""What a folder's files are sent as; other files in a folder are skipped."""


@dataclass(frozen=True)
class _Answer:
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
        help="more X-Amzn-SageMaker-Custom-Attributes, e.g. request_id=abc (top_k comes from "
        "--top-k)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60, help="seconds per request (default: %(default)s)"
    )


def _images(paths: list[Path]) -> list[Path]:
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_TYPES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise LaunchError(f"{path} does not exist")
    if not found:
        raise LaunchError(f"no images ({', '.join(IMAGE_TYPES)}) in {', '.join(map(str, paths))}")
    return found


def _content_type(path: Path) -> str:
    return IMAGE_TYPES.get(path.suffix.lower(), "image/jpeg")


def _is_moto(exc: ClientError, endpoint_url: str) -> bool:
    """moto answers InvokeEndpoint with a binary body by an HTML 500 of its own."""
    error = exc.response.get("Error", {})
    not_aws = "amazonaws.com" not in endpoint_url
    return not_aws and str(error.get("Code")) == "500" and "<html" in str(error.get("Message"))


def format_predictions(name: str, body: dict[str, Any]) -> str:
    """A table of one image's classes as the server ranked them."""
    rows = body.get("predictions", [])
    width = max([len("label"), *(len(str(p.get("label"))) for p in rows)])
    version = body.get("model_version")
    lines = [f"{name}" + (f"  (model {version})" if version else "")]
    lines.append(f"  {'rank':>4}  {'label':<{width}}  {'index':>5}  probability")
    for rank, p in enumerate(rows, 1):
        label = str(p.get("label"))
        lines.append(f"  {rank:>4}  {label:<{width}}  {p.get('index'):>5}  {p['probability']:.4f}")
    return "\n".join(lines)


class _Endpoint:
    def __init__(self, aws: Aws, name: str, timeout: float) -> None:
        config = Config(read_timeout=timeout, retries={"mode": "standard", "max_attempts": 1})
        self._client = aws.boto.client("sagemaker-runtime", config=config)
        self._name = name

    def send(self, body: bytes, content_type: str, attributes: str) -> _Answer:
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
        return _Answer(200, answer["Body"].read())


class _Url:
    def __init__(self, url: str, timeout: float) -> None:
        self._client = httpx.Client(base_url=url.rstrip("/"), timeout=timeout)

    def send(self, body: bytes, content_type: str, attributes: str) -> _Answer:
        headers = {
            "Content-Type": content_type,
            "Accept": "application/json",
            "X-Amzn-SageMaker-Custom-Attributes": attributes,
        }
        try:
            response = self._client.post("/invocations", content=body, headers=headers)
        except httpx.TransportError as exc:
            raise LaunchError(f"cannot reach {self._client.base_url}: {exc}") from exc
        return _Answer(response.status_code, response.content)


def run(args: argparse.Namespace, common: Common) -> int:
    images = _images(args.images)
    attributes = ", ".join(a for a in (f"top_k={args.top_k}", args.custom_attributes) if a)
    target: _Endpoint | _Url = (
        _Endpoint(Aws.connect(common), args.endpoint, args.timeout)
        if args.endpoint
        else _Url(args.url, args.timeout)
    )
    failed = 0
    for path in images:
        try:
            answer = target.send(path.read_bytes(), _content_type(path), attributes)
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
