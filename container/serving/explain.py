"""Grad-CAM: which part of the image made the model choose its class.

The map is computed on the same preprocessed tensor the prediction used, from the last
convolutional block's activations weighted by the class score's gradients, with the full-precision
eager model (the optimised serving model has no autograd). It covers the square the model saw; the
overlay puts it back where that square lies in the whole image, so it has the image's aspect.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.models import ResNet

__all__ = ["grad_cam", "overlay_png"]

_OVERLAY_MAX_SIDE = 512
_OVERLAY_ALPHA = 0.45


def grad_cam(model: ResNet, inputs: torch.Tensor, class_index: int) -> np.ndarray:
    """A (h, w) map in [0, 1] over the model's input, for one image's `class_index`."""
    captured: dict[str, torch.Tensor] = {}

    def keep(module: torch.nn.Module, args: Any, output: torch.Tensor) -> None:
        captured["activations"] = output

    handle = model.layer4.register_forward_hook(keep)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            logits = model(inputs.clone())
            activations = captured["activations"]
            (gradients,) = torch.autograd.grad(logits[0, class_index], activations)
    finally:
        handle.remove()
    weights = gradients.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * activations).sum(dim=1))[0].detach().float()
    peak = cam.max()
    return (cam / peak if peak > 0 else cam).cpu().numpy()


def overlay_png(image: Image.Image, cam: np.ndarray, box: tuple[float, float, float, float]) -> str:
    """The image with the map blended over the square `box` it covers, as base64 PNG."""
    from matplotlib import colormaps  # only requests that ask for explanations pay for it

    scale = min(1.0, _OVERLAY_MAX_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = np.asarray(image.convert("RGB").resize(size), dtype=np.float32)
    left, top, right, bottom = (round(v * scale) for v in box)
    heat = Image.fromarray((cam * 255).astype(np.uint8)).resize(
        (max(1, right - left), max(1, bottom - top)), Image.Resampling.BILINEAR
    )
    canvas = Image.new("L", size)
    canvas.paste(heat, (left, top))
    strength = np.asarray(canvas, dtype=np.float32)[..., None] / 255
    colours = colormaps["jet"](np.asarray(canvas))[..., :3] * 255
    blended = base * (1 - _OVERLAY_ALPHA * strength) + colours * _OVERLAY_ALPHA * strength
    buffer = io.BytesIO()
    Image.fromarray(blended.clip(0, 255).astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
