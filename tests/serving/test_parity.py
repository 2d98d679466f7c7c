"""Train/serve parity: the server's top-1 is the offline evaluation's top-1 on held-out images,
in every precision the server can choose.

The server runs the model as frozen TorchScript in fp32, bf16 or int8 (SERVE_PRECISION, or the
fastest of them with `auto`); the offline path is the training job's own evaluation path
(decoding.decode + eval_crop, images.normalize) through the plain fp32 module, or for int8 through
the artifact's int8 network as an eager module. int8 is held to its own network, not to fp32: how
often the two agree is the training gate's measure (at least int8_min_agreement on valid,
tests/training/test_quantization.py), and an image near a tie between two classes may flip (one
in 24 here, on an AMD EPYC).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from container import int8
from container.decoding import decode, eval_crop
from container.images import normalize, to_uint8_hwc
from container.model import WithFeatures, load_artifact
from container.sagemaker_env import OptMl
from container.serving.predictor import Optimize, Precision, Predictor
from tests.serving.conftest import App, in_process, serve_settings

pytestmark = pytest.mark.long  # tests/conftest.py hands it out early


def _offline_top1(trained: OptMl, images: list[Path], precision: str) -> list[int]:
    """The offline evaluation's top-1: the fp32 module, or the int8 network for int8."""
    artifact = load_artifact(trained.model_dir)
    prep = artifact.preprocessing
    batch = torch.stack(
        [to_uint8_hwc(eval_crop(decode(p, min_side=prep.resize_size), prep)) for p in images]
    )
    model: torch.nn.Module = WithFeatures(artifact.model).eval()
    if precision == "int8":
        model = int8.load(model, artifact.int8_state or {}, prep.image_size)  # type: ignore[arg-type]
    with torch.inference_mode():
        logits, _ = model(normalize(batch, prep, torch.device("cpu")))
    return logits.argmax(dim=1).tolist()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def offline_top1(trained: OptMl, test_images: list[Path]) -> Callable[[str], list[int]]:
    """`_offline_top1` of the held-out images by precision, each worked out once (four tests
    compare with int8's, whose network takes about a second to build)."""
    return functools.cache(functools.partial(_offline_top1, trained, test_images))


def _served_top1(app: App, images: list[Path]) -> list[int]:
    served = []
    for path in images:
        content_type = "image/png" if path.suffix == ".png" else "image/jpeg"
        response = app.post(path.read_bytes(), content_type)
        assert response.status_code == 200, response.text
        served.append(response.json()["predictions"][0]["index"])
    return served


def test_served_top1_equals_offline_evaluation(
    app: App, offline_top1: Callable[[str], list[int]], test_images: list[Path]
) -> None:
    """With the defaults (SERVE_PRECISION=auto: whichever precision measured fastest)."""
    (ready,) = app.log_lines(r"Ready in .* on cpu")
    chosen = re.search(r" (fp32|bf16|int8) on cpu", ready)
    assert chosen is not None, ready
    expected = offline_top1(chosen[1])
    served = _served_top1(app, test_images)
    assert served == expected
    # The offline evaluation of the shipped model agrees with the job's own report.
    labels = [sorted(p.parent.parent.iterdir()).index(p.parent) for p in test_images]
    accuracy = sum(s == label for s, label in zip(served, labels, strict=True)) / len(labels)
    assert accuracy > 0.5


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_each_precision_serves_the_offline_top1(
    trained: OptMl,
    offline_top1: Callable[[str], list[int]],
    test_images: list[Path],
    precision: str,
) -> None:
    """Every candidate of SERVE_PRECISION=auto on a CPU, forced, through the whole server."""
    with in_process(serve_settings(trained, precision=precision)) as app:
        app.wait_until(200)
        expected = offline_top1(precision)
        assert _served_top1(app, test_images) == expected
        assert app.log_lines(rf"Ready in .* {precision} on cpu")


@pytest.mark.parametrize("optimize", ["jit", "fused", "eager"])
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_reduced_precision_forms_keep_top1(
    trained: OptMl,
    offline_top1: Callable[[str], list[int]],
    test_images: list[Path],
    optimize: Optimize,
    precision: Precision,
) -> None:
    """bf16 (traced and frozen, fused or eager) against fp32, int8 against its eager network,
    image by image."""
    artifact = load_artifact(trained.model_dir)
    predictor = Predictor(artifact, torch.device("cpu"), [precision], optimize)
    prep = artifact.preprocessing
    prepared = [
        to_uint8_hwc(eval_crop(decode(p, min_side=prep.resize_size), prep)) for p in test_images
    ]
    fast = [int(p.logits.argmax()) for p in predictor.predict(prepared)]
    if precision == "int8":
        reference = offline_top1("int8")
    else:
        reference = [int(p.logits.argmax()) for p in predictor.predict_fp32(prepared)]
    assert fast == reference
