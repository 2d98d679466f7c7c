"""`launch explain`: why the model chose what it chose, for a folder of images.

Two kinds of explanation. Grad-CAM comes from the server itself (custom attribute
`explain=gradcam`), asked of an endpoint or of a local server (`--url`), and lands in ONE
self-contained HTML gallery: each image, its overlay, its top classes. `--clarify` instead runs a
SageMaker Clarify processing job (SHAP over SLIC superpixels) against a SageMaker model; its report
lands in S3.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import logging
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from sagemaker.clarify import (
    DataConfig,
    ImageConfig,
    ModelConfig,
    ModelPredictedLabelConfig,
    SageMakerClarifyProcessor,
    SHAPConfig,
)

from container import html_page
from launch.aws import Aws, console_url, job_name
from launch.errors import LaunchError
from launch.invoke import Endpoint, Url, image_files, media_type
from launch.settings import Common, add_wait_argument

__all__ = ["HELP", "Explained", "add_arguments", "gallery", "run"]

HELP = (
    "Grad-CAM gallery (HTML) of a folder of images from an endpoint or a local server; or Clarify"
)

# Clarify needs every class's probability in class order: ask for all (the server's top_k is at
# most 1000) and sort by index. JMESPath does the sorting.
_CLARIFY_ATTRIBUTES = "top_k=1000"
_TIMEOUT_S = 70  # per image: Grad-CAM runs a backward pass on the server
_CLARIFY_PROBABILITIES = "sort_by(predictions, &index)[].probability"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explained:
    """One image and what the server said about it."""

    path: Path
    predictions: list[dict[str, Any]]
    overlay_png: str
    """base64 PNG"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "images", help="a folder of JPEGs (searched recursively); or s3:// with --clarify"
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--endpoint", metavar="NAME", help="a SageMaker endpoint (launch deploy)")
    source.add_argument(
        "--url", help="a local server, e.g. http://localhost:8080 (docker run IMAGE serve)"
    )
    source.add_argument(
        "--clarify", metavar="MODEL", help="run Clarify SHAP on this SageMaker model"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gallery.html"), help="(default: %(default)s)"
    )
    parser.add_argument(
        "--top-k", type=int, default=3, help="classes shown per image (default: %(default)s)"
    )
    parser.add_argument(
        "--limit", type=int, default=50, help="at most this many images (default: %(default)s)"
    )
    clarify = parser.add_argument_group("--clarify")
    clarify.add_argument(
        "--num-segments",
        type=int,
        default=20,
        help="SLIC superpixels per image (default: %(default)s)",
    )
    clarify.add_argument(
        "--num-samples", type=int, default=100, help="SHAP samples per image (default: %(default)s)"
    )
    clarify.add_argument(
        "--instance-type", default="ml.m5.xlarge", help="processing instance (default: %(default)s)"
    )
    clarify.add_argument(
        "--model-instance-type",
        default="ml.m5.xlarge",
        help="instance of Clarify's shadow endpoint (default: %(default)s)",
    )
    add_wait_argument(clarify, "for the job", default=False)


def _images(folder: Path, limit: int) -> list[Path]:
    if not folder.is_dir():
        raise LaunchError(f"{folder} is not a folder: give a folder of .jpg or .png images")
    found = image_files(folder)
    if not found:
        raise LaunchError(f"no .jpg or .png images under {folder}")
    if len(found) > limit:
        logger.info(
            "%d images under %s: explaining the first %d (--limit)", len(found), folder, limit
        )
    return found[:limit]


def _parse(path: Path, body: bytes) -> Explained:
    try:
        answer = json.loads(body)
        explanation = answer["explanation"]
        return Explained(path, answer["predictions"], explanation["overlay_png"])
    except (ValueError, KeyError, TypeError) as exc:
        raise LaunchError(
            f"{path.name}: the server's answer has no Grad-CAM explanation ({exc!r})"
        ) from exc


def _explain(target: Endpoint | Url, where: str, images: list[Path], top_k: int) -> list[Explained]:
    """Each image's top classes and Grad-CAM, from `target` (called `where` in errors)."""
    attributes = f"top_k={top_k}, explain=gradcam"
    done = []
    with closing(target):
        for path in images:
            answer = target.send(path.read_bytes(), media_type(path), attributes)
            if answer.status != 200:
                text = answer.body.decode(errors="replace")[:300]
                raise LaunchError(f"{path.name}: {where} answered {answer.status}: {text}")
            done.append(_parse(path, answer.body))
    return done


@contextmanager
def _named(kind: str, name: str, region: str) -> Iterator[None]:
    """Around a describe_* of what the user named: its ValidationException means it is missing."""
    try:
        yield
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "ValidationException":
            raise LaunchError(
                f"no {kind} {name!r} in {region}: launch deploy prints its name"
            ) from exc
        raise


def _in_service(aws: Aws, endpoint: str) -> Endpoint:
    """The endpoint, once it is known to answer: a LaunchError says why not."""
    with _named("endpoint", endpoint, aws.region):
        described = aws.boto.client("sagemaker").describe_endpoint(EndpointName=endpoint)
    status = described["EndpointStatus"]
    if status != "InService":
        raise LaunchError(f"endpoint {endpoint} is {status}, not InService: wait, or redeploy")
    return Endpoint(aws, endpoint, _TIMEOUT_S)


def _data_uri(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f"data:{media_type(path)};base64,{data}"


_GALLERY_STYLE = (
    "figure{display:inline-block;margin:.5em;vertical-align:top}"
    "figure img{height:224px;margin-right:4px}"
)


def gallery(explained: list[Explained], title: str) -> str:
    """One HTML page with every image inline (data: URIs), so it can be mailed or archived."""
    cards = []
    for item in explained:
        rows = "".join(
            f"<tr><td>{html.escape(str(p['label']))}</td><td>{float(p['probability']):.1%}</td></tr>"
            for p in item.predictions
        )
        name = html.escape(item.path.name)
        cards.append(
            "<figure>"
            f'<div><img alt="{name}" src="{_data_uri(item.path)}">'
            f"{html_page.png(item.overlay_png, f'Grad-CAM of {item.path.name}')}</div>"
            f"<figcaption>{name}<table>{rows}</table></figcaption>"
            "</figure>"
        )
    return html_page.page(
        title,
        html_page.paragraph("Left: the image; right: Grad-CAM of the top class over it."),
        *cards,
        style=_GALLERY_STYLE,
    )


def _clarify(args: argparse.Namespace, common: Common) -> int:
    role = common.need("role")
    aws = Aws.connect(common)
    with _named("model", args.clarify, aws.region):  # Clarify would find out minutes later
        aws.boto.client("sagemaker").describe_model(ModelName=args.clarify)
    name = job_name(common.prefix, "clarify")
    if args.images.startswith("s3://"):
        data = args.images
    else:
        folder = Path(args.images)
        _images(folder, 1)  # fails early, with the usual message, on a folder without JPEGs
        data = aws.sagemaker.upload_data(str(folder), aws.bucket, f"{common.prefix}/{name}/images")
    output = aws.s3_uri(name, "report")
    processor = SageMakerClarifyProcessor(
        role=role,
        instance_count=1,
        instance_type=args.instance_type,
        sagemaker_session=aws.sagemaker,
    )
    processor.run_explainability(
        data_config=DataConfig(
            s3_data_input_path=data,
            s3_output_path=output,
            dataset_type="application/x-image",
        ),
        model_config=ModelConfig(
            model_name=args.clarify,
            instance_count=1,
            instance_type=args.model_instance_type,
            content_type="image/jpeg",
            accept_type="application/json",
            custom_attributes=_CLARIFY_ATTRIBUTES,
        ),
        explainability_config=SHAPConfig(
            num_samples=args.num_samples,
            image_config=ImageConfig(
                model_type="IMAGE_CLASSIFICATION",
                num_segments=args.num_segments,
                feature_extraction_method="segmentation",
            ),
        ),
        model_scores=ModelPredictedLabelConfig(probability=_CLARIFY_PROBABILITIES),
        wait=args.wait,
        logs=False,
        job_name=name,
    )
    print(f"clarify job: {name}")
    print(f"console:     {console_url(aws.region, 'processing-jobs', name)}")
    print(f"report:      {output}/ (report.html, and a heatmap per image)")
    return 0


def run(args: argparse.Namespace, common: Common) -> int:
    if args.clarify:
        return _clarify(args, common)
    images = _images(Path(args.images), args.limit)
    if args.url:
        explained = _explain(Url(args.url, _TIMEOUT_S), args.url, images, args.top_k)
        title = f"Grad-CAM from {args.url}"
    else:
        target = _in_service(Aws.connect(common), args.endpoint)
        explained = _explain(target, f"endpoint {args.endpoint}", images, args.top_k)
        title = f"Grad-CAM from endpoint {args.endpoint}"
    args.out.write_text(gallery(explained, title))
    print(f"{args.out}: {len(explained)} image(s), Grad-CAM of each one's top class")
    return 0
