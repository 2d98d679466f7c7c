"""Train/serve parity: the server's top-1 is the offline evaluation's top-1 on held-out images,
in every precision the server can choose.

The server runs the model as frozen TorchScript in fp32, bf16 or int8 (SERVE_PRECISION, or the
fastest of them with `auto`); the offline path is the training job's own evaluation path
(decoding.decode + eval_crop, images.normalize) through the plain fp32 module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from container.decoding import decode, eval_crop
from container.images import normalize, to_uint8_hwc
from container.model import load_artifact
from container.sagemaker_env import OptMl
from container.serving.predictor import Precision, Predictor
from tests.serving.conftest import App, in_process, serve_settings


def _offline_top1(trained: OptMl, images: list[Path]) -> list[int]:
    artifact = load_artifact(trained.model_dir)
    prep = artifact.preprocessing
    batch = torch.stack(
        [to_uint8_hwc(eval_crop(decode(p, min_side=prep.resize_size), prep)) for p in images]
    )
    with torch.inference_mode():
        logits = artifact.model(normalize(batch, prep, torch.device("cpu")))
    return logits.argmax(dim=1).tolist()


def _served_top1(app: App, images: list[Path]) -> list[int]:
    served = []
    for path in images:
        content_type = "image/png" if path.suffix == ".png" else "image/jpeg"
        response = app.post(path.read_bytes(), content_type)
        assert response.status_code == 200, response.text
        served.append(response.json()["predictions"][0]["index"])
    return served


def test_served_top1_equals_offline_evaluation(
    app: App, trained: OptMl, test_images: list[Path]
) -> None:
    """With the defaults (SERVE_PRECISION=auto: whichever precision measured fastest)."""
    expected = _offline_top1(trained, test_images)
    served = _served_top1(app, test_images)
    assert served == expected
    # The offline evaluation of the shipped model agrees with the job's own report.
    labels = [sorted(p.parent.parent.iterdir()).index(p.parent) for p in test_images]
    accuracy = sum(s == label for s, label in zip(served, labels, strict=True)) / len(labels)
    assert accuracy > 0.5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_each_precision_serves_the_offline_top1(
    trained: OptMl, test_images: list[Path], precision: str
) -> None:
    """Every candidate of SERVE_PRECISION=auto on a CPU, forced, through the whole server."""
    with in_process(serve_settings(trained, precision=precision)) as app:
        app.wait_until(200)
        assert _served_top1(app, test_images) == _offline_top1(trained, test_images)
        assert app.log_lines(rf"Ready in .* {precision} on cpu")


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_forms_keep_top1(
    trained: OptMl, test_images: list[Path], optimize: bool, precision: Precision
) -> None:
    """bf16 and int8 (traced and frozen, or eager) against fp32, image by image."""
    artifact = load_artifact(trained.model_dir)
    predictor = Predictor(artifact, torch.device("cpu"), [precision], optimize)
    prep = artifact.preprocessing
    prepared = [
        to_uint8_hwc(eval_crop(decode(p, min_side=prep.resize_size), prep)) for p in test_images
    ]
    fast = [int(p.logits.argmax()) for p in predictor.predict(prepared)]
    reference = [int(p.logits.argmax()) for p in predictor.predict_fp32(prepared)]
    assert fast == reference
