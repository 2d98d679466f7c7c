"""The model as the server uses it: found, loaded, made fast, warmed up; images in, scores out.

Serving runs the artifact's weights in reduced precision where the hardware has it (bf16 on CPUs
with bf16 units, fp16 on GPUs), channels-last, and by default as TorchScript traced and frozen
(BatchNorm folded into the convolutions). tests/serving/test_parity.py shows that this gives the
same top-1 as the plain fp32 model on held-out images. Grad-CAM uses the fp32 module itself.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models import ResNet

from container.abstention import Answer, Outputs, Override, answer
from container.archives import ArchiveError, is_archive, unpack_once
from container.decoding import Preprocessing, eval_box
from container.devices import DeviceChoice, cpu_has_bf16, resolve_device
from container.images import normalize
from container.model import META_FILE, Artifact, ArtifactError, backbone, load_artifact
from container.serving.explain import grad_cam, overlay_png

__all__ = ["Predictor", "Prepared", "find_model_dir", "load_predictor"]

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Prepared:
    """A request image ready for the model: its crop as uint8 pixels, and what it came from."""

    name: str
    pixels: torch.Tensor  # (S, S, 3) uint8
    image: Image.Image | None  # the image (at most 512 px), kept only for an explanation


def _tree(folder: Path, depth: int = 2) -> list[str]:
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir())[:20]:
        found.append(path.name + ("/" if path.is_dir() else ""))
        if path.is_dir() and depth > 1:
            found += [f"{path.name}/{sub}" for sub in _tree(path, depth - 1)]
    return found


def find_model_dir(model_dir: Path, scratch: Path) -> Path:
    """Where the artifact is: `model_dir` itself, one folder down, or inside a model.tar.gz.

    SageMaker untars model.tar.gz into /opt/ml/model, but a tarball made from a folder (not from
    its contents) leaves that folder in between, and a local `docker run` may mount the tarball.
    """
    candidates = [model_dir]
    if model_dir.is_dir():
        entries = [p for p in sorted(model_dir.iterdir()) if not p.name.startswith(".")]
        candidates += [p for p in entries if p.is_dir()]
        for archive in (p for p in entries if is_archive(p)):
            try:
                unpacked = unpack_once(archive, scratch / archive.name.split(".")[0])
            except ArchiveError as exc:
                raise ArtifactError(str(exc)) from exc
            candidates += [unpacked, *(p for p in sorted(unpacked.iterdir()) if p.is_dir())]
    for candidate in candidates:
        if (candidate / META_FILE).is_file():
            return candidate
    raise ArtifactError(
        f"no model in {model_dir}: expected {META_FILE}, model.pt and classes.json there, one "
        f"folder down, or in a model.tar.gz; found {_tree(model_dir) or 'nothing'}"
    )


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if precision == "fp16" and device.type == "cpu":
        logger.warning("SERVE_PRECISION=fp16 is not fast on a CPU; serving in fp32")
        return torch.float32
    return _DTYPES[precision]


class Predictor:
    """Runs batches and explanations on prepared images (on the model's thread)."""

    def __init__(
        self, artifact: Artifact, device: torch.device, dtype: torch.dtype, optimize: bool
    ) -> None:
        self.classes = artifact.classes
        self.model_version = artifact.model_version
        self.prep: Preprocessing = artifact.preprocessing
        self.device = device
        self.dtype = dtype
        self.policy = artifact.policy
        model = artifact.model.to(memory_format=torch.channels_last).eval()
        assert isinstance(model, ResNet)
        self._fp32 = model
        self._fp32_outputs = _WithFeatures(model).eval()
        self._fast: Any = _fast_model(model, dtype, self.prep, device) if optimize else None
        self.form = (
            f"{'TorchScript (traced, frozen)' if optimize else 'eager'} "
            f"{str(dtype).removeprefix('torch.')} on {device}"
        )

    def _inputs(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor:
        return normalize(torch.stack(list(pixels)), self.prep, self.device)

    @torch.inference_mode()
    def predict(self, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        """Logits and pooled features (float32, CPU) for a batch of prepared pixels, one
        `Outputs` of a batch of one per image, in order."""
        inputs = self._inputs(batch)
        if self._fast is not None:
            logits, features = self._fast(inputs.to(self.dtype))
        else:
            with torch.autocast(self.device.type, self.dtype, self.dtype != torch.float32):
                logits, features = self._fp32_outputs(inputs)
        return _split(logits, features)

    def predict_fp32(self, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        """The plain full-precision module's outputs: the reference for parity checks."""
        with torch.inference_mode():
            return _split(*self._fp32_outputs(self._inputs(batch)))

    def answer(self, outputs: Outputs, override: Override) -> Answer:
        """Calibrated probabilities and the abstention decision for one image."""
        return answer(outputs, self.policy, override)

    def explain(self, prepared: Prepared, class_index: int) -> dict[str, Any]:
        """Grad-CAM for one prepared image (needs `keep_image`) and one class."""
        assert prepared.image is not None
        cam = grad_cam(self._fp32, self._inputs([prepared.pixels]), class_index)
        box = eval_box(prepared.image.size, self.prep)
        return {
            "method": "gradcam",
            "index": class_index,
            "label": self.classes[class_index],
            "heatmap": np.round(cam, 4).tolist(),
            "box": [round(v, 1) for v in box],
            "overlay_png": overlay_png(prepared.image, cam, box),
        }

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every batch size a few times: first calls pay for allocation and JIT profiling."""
        side = self.prep.image_size
        for size in batch_sizes:
            for _ in range(3):
                self.predict([torch.zeros(side, side, 3, dtype=torch.uint8)] * size)


class _WithFeatures(nn.Module):
    """The network, answering its logits and the pooled features they are computed from."""

    def __init__(self, model: ResNet) -> None:
        super().__init__()
        self.body = backbone(model)
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.fc(features), features


def _split(logits: torch.Tensor, features: torch.Tensor) -> list[Outputs]:
    logits, features = logits.float().cpu(), features.float().cpu()
    return [Outputs(logits[i : i + 1], features[i : i + 1]) for i in range(len(logits))]


def _fast_model(
    model: ResNet, dtype: torch.dtype, prep: Preprocessing, device: torch.device
) -> Any:
    low = _WithFeatures(copy.deepcopy(model)).to(dtype=dtype).eval()
    low = low.to(memory_format=torch.channels_last)
    example = torch.zeros(2, 3, prep.image_size, prep.image_size, device=device, dtype=dtype)
    with torch.inference_mode(), warnings.catch_warnings():
        # torch.jit is in maintenance mode and says so; tracing a ResNet is what it does best.
        warnings.simplefilter("ignore")
        example = example.contiguous(memory_format=torch.channels_last)
        traced = torch.jit.trace(low, example)  # type: ignore[no-untyped-call]
        return torch.jit.freeze(traced)


def load_predictor(
    model_dir: Path,
    scratch: Path,
    device_choice: DeviceChoice,
    precision: str,
    optimize: bool,
    max_batch_size: int,
) -> Predictor:
    """Choose the device, then find, load, optimise and warm up the model; ArtifactError says
    what was found instead, CudaUnusableError why SERVE_DEVICE=cuda cannot be honoured."""
    device = resolve_device(device_choice)
    artifact = load_artifact(find_model_dir(model_dir, scratch), device)
    predictor = Predictor(artifact, device, _dtype(precision, device), optimize)
    predictor.warm_up(sorted({1, max_batch_size}))
    return predictor
