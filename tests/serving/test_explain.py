"""Grad-CAM explanations, asked for with the custom attribute `explain=gradcam`."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw

from tests.serving.conftest import App, jpeg

EXPLAIN = {"x_amzn_sagemaker_custom_attributes": "explain=gradcam"}


def _scene(left: int, size: tuple[int, int] = (200, 200)) -> Image.Image:
    """Noise, and one red ellipse (the first sample class) whose left edge is at `left`."""
    rng = np.random.default_rng(3)
    noise = rng.integers(70, 150, (size[1], size[0], 3)).astype(np.uint8)
    image = Image.fromarray(noise, "RGB")
    top = (size[1] - 80) // 2
    ImageDraw.Draw(image).ellipse((left, top, left + 80, top + 80), fill=(235, 25, 25))
    return image


def _explain(app: App, image: Image.Image) -> dict[str, object]:
    response = app.post(jpeg(image, quality=95), **EXPLAIN)
    assert response.status_code == 200, response.text
    body = response.json()
    explanation = body["explanation"]
    assert isinstance(explanation, dict)
    assert explanation["index"] == body["predictions"][0]["index"]
    return explanation


def _centre_x(heatmap: np.ndarray) -> float:
    columns = heatmap.sum(axis=0)
    return float((columns * np.arange(len(columns))).sum() / columns.sum())


def test_heatmap_is_a_normalised_map_over_the_input(app: App) -> None:
    explanation = _explain(app, _scene(left=60))
    assert explanation["method"] == "gradcam"
    heatmap = np.asarray(explanation["heatmap"])
    assert heatmap.shape == (4, 4)  # 128 px input, ResNet stride 32
    assert heatmap.min() >= 0
    assert heatmap.max() == 1.0
    assert 0 < heatmap.mean() < 1


def test_overlay_has_the_image_aspect(app: App) -> None:
    image = _scene(left=40, size=(360, 200))
    explanation = _explain(app, image)
    overlay = Image.open(io.BytesIO(base64.b64decode(str(explanation["overlay_png"]))))
    assert overlay.format == "PNG"
    assert abs(overlay.width / overlay.height - 360 / 200) < 0.02
    left, top, right, bottom = explanation["box"]  # the square the model saw, in image pixels
    assert right - left == bottom - top
    assert 0 <= left < right <= 360
    assert 0 <= top < bottom <= 200


def test_the_map_follows_the_object(app: App) -> None:
    on_the_left = np.asarray(_explain(app, _scene(left=15))["heatmap"])
    on_the_right = np.asarray(_explain(app, _scene(left=105))["heatmap"])
    assert not np.allclose(on_the_left, on_the_right)
    assert _centre_x(on_the_left) < _centre_x(on_the_right)


def test_only_on_request_and_for_every_image(app: App) -> None:
    plain = app.post(jpeg(_scene(left=60)))
    assert "explanation" not in plain.json()
    many = app.client.post(
        "/invocations",
        files=[("image", ("a.jpg", jpeg(_scene(15)))), ("image", ("b.jpg", jpeg(_scene(105))))],
        headers={"X-Amzn-SageMaker-Custom-Attributes": "explain=gradcam"},
    )
    assert many.status_code == 200
    assert all("explanation" in r for r in many.json()["results"])
