"""The model as the server uses it: found, loaded, made fast, warmed up; images in, scores out.

Serving runs the network channels-last and by default as TorchScript traced and frozen (BatchNorm
folded into the convolutions), in the precision SERVE_PRECISION names or, with `auto`, in the
fastest of those this host and artifact allow, timed at warm-up at the batch sizes the server
runs: fp32, bf16 (CPUs with native bf16 units), int8 (the CPU, when the artifact's int8 network
passed its gate at training: container/int8.py), fp16/bf16/fp32 on a GPU. A CPU flag only says
what may be tried; the measurement decides. tests/serving/test_parity.py shows that every form
gives the same top-1 as the plain fp32 model on held-out images. Grad-CAM uses the fp32 module.
"""

from __future__ import annotations

import copy
import logging
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.fx.experimental.optimization import fuse
from torchvision.models import ResNet

from container import int8
from container.abstention import Answer, Outputs, Override, Policy, answer
from container.archives import ArchiveError, is_archive, unpack_name, unpack_once
from container.decoding import Preprocessing, eval_box
from container.devices import DeviceChoice, cpu_has_bf16, resolve_device
from container.images import normalize
from container.model import META_FILE, Artifact, ArtifactError, WithFeatures, load_artifact
from container.serving.explain import grad_cam, overlay_png

__all__ = [
    "Measured",
    "Optimize",
    "Precision",
    "PrecisionError",
    "Predictor",
    "Prepared",
    "candidates",
    "find_model_dir",
    "load_predictor",
]

logger = logging.getLogger(__name__)

_GRAPHS = threading.RLock()
"""Held while a module is traced (torch.fx or torch.jit) and while one runs. torch.fx's tracer
patches `torch.nn.Module.__call__` for the whole process, so a model answering on the model
thread while another loads on a multi-model endpoint would be caught in that model's trace and
fail ("module is not installed as a submodule")."""


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
    """Where the artifact is: `model_dir` itself, one folder down, or inside a model.tar.gz
    (in `model_dir`, or `model_dir` itself).

    SageMaker untars model.tar.gz into /opt/ml/model, but a tarball made from a folder (not from
    its contents) leaves that folder in between, and a local `docker run` may mount the tarball;
    the SDK's local mode leaves a multi-model endpoint's tarballs as they are.
    """
    candidates = [model_dir]
    archives = [model_dir] if is_archive(model_dir) else []
    if model_dir.is_dir():
        entries = [p for p in sorted(model_dir.iterdir()) if not p.name.startswith(".")]
        candidates += [p for p in entries if p.is_dir()]
        archives = [p for p in entries if is_archive(p)]
    for archive in archives:
        try:
            unpacked = unpack_once(archive, scratch / unpack_name(archive))
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


Optimize = Literal["jit", "fused", "eager"]
"""How the network runs: traced and frozen TorchScript; the eager module with BatchNorm folded
into the convolutions by torch.fx (within a few per cent of jit, and freed when dropped, which
TorchScript's traced modules are not: pytorch/pytorch#96726); or the plain eager module."""

_FORMS = {
    "jit": "TorchScript (traced, frozen)",
    "fused": "eager, BatchNorm fused",
    "eager": "eager",
}

Precision = Literal["fp32", "bf16", "fp16", "int8"]
"""A form the server can run the network in; SERVE_PRECISION adds `auto` (measure, then choose)."""

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_ROUNDS = 3
"""Timed passes per candidate and batch size when SERVE_PRECISION=auto measures."""


class PrecisionError(ValueError):
    """Raised when the SERVE_PRECISION asked for cannot run this model on this device; the
    message says why and what to set instead (safe to show clients)."""


def candidates(requested: str, device: torch.device, artifact: Artifact) -> list[Precision]:
    """The precisions to run (`auto`: every one the device and the artifact allow, to measure);
    PrecisionError when an explicit one cannot run."""
    refused = int8.available(artifact)
    if requested == "auto":
        if device.type == "cuda":
            return ["fp16", "bf16", "fp32"] if torch.cuda.is_bf16_supported() else ["fp16", "fp32"]
        found: list[Precision] = ["fp32"]
        if cpu_has_bf16():
            found.append("bf16")
        else:
            logger.info("SERVE_PRECISION=auto: no bf16 (this CPU has no native bf16 units)")
        if refused is None:
            found.append("int8")
        else:
            logger.info("SERVE_PRECISION=auto: no int8 (%s)", refused)
        return found
    if requested == "int8":
        if device.type != "cpu":
            raise PrecisionError(
                "SERVE_PRECISION=int8 runs on the CPU only; set SERVE_DEVICE=cpu, or "
                "SERVE_PRECISION=auto"
            )
        if refused is not None:
            raise PrecisionError(
                f"SERVE_PRECISION=int8, but {refused}; set SERVE_PRECISION=auto or fp32"
            )
    if requested == "fp16" and device.type == "cpu":
        logger.warning("SERVE_PRECISION=fp16 is not fast on a CPU; serving in fp32")
        return ["fp32"]
    return [cast(Precision, requested)]


Run = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class _Form:
    """The network in one precision: normalised float32 inputs in, logits and features out."""

    precision: Precision
    run: Run
    device: torch.device  # where its inputs go
    policy: Policy


@dataclass(frozen=True)
class Measured:
    """What SERVE_PRECISION=auto timed: seconds per image, by precision and batch size."""

    seconds: dict[str, dict[int, float]]
    chosen: str

    def describe(self) -> str:
        sizes = next(iter(self.seconds.values()))
        timed = ", ".join(
            f"{precision} " + " and ".join(f"{1000 * by_size[s]:.2f}" for s in sizes)
            for precision, by_size in self.seconds.items()
        )
        return (
            f"measured ms per image at batch {' and '.join(map(str, sizes))}: {timed}; "
            f"serving {self.chosen}"
        )


class Predictor:
    """Runs batches and explanations on prepared images (on the model's thread).

    Built with one precision, or several to measure (`choose`), the network runs in the fastest.
    """

    def __init__(
        self,
        artifact: Artifact,
        device: torch.device,
        precisions: Sequence[Precision],
        optimize: Optimize,
    ) -> None:
        self.classes = artifact.classes
        self.model_version = artifact.model_version
        self.prep: Preprocessing = artifact.preprocessing
        self.device = device
        model = artifact.model.to(memory_format=torch.channels_last).eval()
        assert isinstance(model, ResNet)
        self._fp32 = model
        self._fp32_outputs = WithFeatures(model).eval()
        self._optimize = optimize
        with _GRAPHS:
            self._forms = {p: self._build(p, artifact) for p in precisions}
        self._form = self._forms[precisions[0]]

    @property
    def precision(self) -> Precision:
        return self._form.precision

    @property
    def policy(self) -> Policy:
        """The abstention policy for the outputs of the precision in use."""
        return self._form.policy

    @property
    def form(self) -> str:
        return f"{_FORMS[self._optimize]} {self.precision} on {self._form.device}"

    def _build(self, precision: Precision, artifact: Artifact) -> _Form:
        size = self.prep.image_size
        if precision == "int8":
            cpu = torch.device("cpu")
            quantized = int8.load(self._fp32_outputs, artifact.int8_state or {}, size)
            jit = self._optimize == "jit"
            run = _traced(quantized, torch.float32, cpu, size) if jit else quantized
            return _Form("int8", run, cpu, int8.policy(artifact))
        dtype = _DTYPES[precision]
        if self._optimize != "eager":
            module = WithFeatures(copy.deepcopy(self._fp32)).eval()
            low: Any = (
                _traced(module.to(dtype=dtype), dtype, self.device, size)
                if self._optimize == "jit"
                else fuse(module).to(dtype=dtype).to(memory_format=torch.channels_last)
            )
            return _Form(precision, lambda x: low(x.to(dtype)), self.device, artifact.policy)

        def eager(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            with torch.autocast(self.device.type, dtype, dtype != torch.float32):
                return self._fp32_outputs(x)  # type: ignore[no-any-return]

        return _Form(precision, eager, self.device, artifact.policy)

    def _inputs(self, pixels: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        return normalize(torch.stack(list(pixels)), self.prep, device)

    def _run(self, form: _Form, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        with _GRAPHS, torch.inference_mode():
            return _split(*form.run(self._inputs(batch, form.device)))

    def predict(self, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        """Logits and pooled features (float32, CPU) for a batch of prepared pixels, one
        `Outputs` of a batch of one per image, in order."""
        return self._run(self._form, batch)

    def predict_fp32(self, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        """The plain full-precision module's outputs: the reference for parity checks."""
        with _GRAPHS, torch.inference_mode():
            return _split(*self._fp32_outputs(self._inputs(batch, self.device)))

    def answer(self, outputs: Outputs, override: Override) -> Answer:
        """Calibrated probabilities and the abstention decision for one image."""
        return answer(outputs, self.policy, override)

    def explain(self, prepared: Prepared, class_index: int) -> dict[str, Any]:
        """Grad-CAM for one prepared image (needs `keep_image`) and one class, on the fp32
        network whatever precision serves."""
        assert prepared.image is not None
        with _GRAPHS:
            cam = grad_cam(self._fp32, self._inputs([prepared.pixels], self.device), class_index)
        box = eval_box(prepared.image.size, self.prep)
        return {
            "method": "gradcam",
            "index": class_index,
            "label": self.classes[class_index],
            "heatmap": np.round(cam, 4).tolist(),
            "box": [round(v, 1) for v in box],
            "overlay_png": overlay_png(prepared.image, cam, box),
        }

    def _batch(self, size: int) -> list[torch.Tensor]:
        side = self.prep.image_size
        return [torch.zeros(side, side, 3, dtype=torch.uint8)] * size

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        """Run every form at every batch size a few times: first calls pay for allocation and
        JIT profiling."""
        for form in self._forms.values():
            for size in batch_sizes:
                for _ in range(3):
                    self._run(form, self._batch(size))

    def choose(self, batch_sizes: Sequence[int]) -> Measured | None:
        """Time every form (after `warm_up`) at each batch size, interleaved, and keep the one
        with the least time per image (geometric mean over the sizes of the best of `_ROUNDS`:
        other work on the host only ever adds time); None when there is one form only."""
        if len(self._forms) == 1:
            return None
        times: dict[str, dict[int, list[float]]] = {
            p: {s: [] for s in batch_sizes} for p in self._forms
        }
        for _ in range(_ROUNDS):
            for precision, form in self._forms.items():
                for size in batch_sizes:
                    started = time.perf_counter()
                    self._run(form, self._batch(size))
                    times[precision][size].append((time.perf_counter() - started) / size)
        seconds = {p: {s: min(t) for s, t in by_size.items()} for p, by_size in times.items()}
        chosen = min(seconds, key=lambda p: statistics.geometric_mean(seconds[p].values()))
        self._form = self._forms[cast(Precision, chosen)]
        self._forms = {self._form.precision: self._form}
        return Measured(seconds, chosen)


def _split(logits: torch.Tensor, features: torch.Tensor) -> list[Outputs]:
    logits, features = logits.float().cpu(), features.float().cpu()
    return [Outputs(logits[i : i + 1], features[i : i + 1]) for i in range(len(logits))]


def _traced(module: nn.Module, dtype: torch.dtype, device: torch.device, size: int) -> Any:
    """`module` as TorchScript, traced on a channels-last batch and frozen."""
    module = module.to(memory_format=torch.channels_last)
    example = torch.zeros(2, 3, size, size, device=device, dtype=dtype)
    with torch.inference_mode(), warnings.catch_warnings():
        # torch.jit is in maintenance mode and says so; tracing a ResNet is what it does best.
        warnings.simplefilter("ignore")
        example = example.contiguous(memory_format=torch.channels_last)
        traced = torch.jit.trace(module, example)  # type: ignore[no-untyped-call]
        return torch.jit.freeze(traced)


def load_predictor(
    model_dir: Path,
    scratch: Path,
    device_choice: DeviceChoice,
    precision: str,
    optimize: Optimize,
    max_batch_size: int,
) -> Predictor:
    """Choose the device, then find, load, optimise and warm up the model, and with
    SERVE_PRECISION=auto measure its forms and keep the fastest; ArtifactError says what was
    found instead, CudaUnusableError why SERVE_DEVICE=cuda cannot be honoured, PrecisionError
    why the precision asked for cannot run."""
    device = resolve_device(device_choice)
    artifact = load_artifact(find_model_dir(model_dir, scratch), device)
    predictor = Predictor(artifact, device, candidates(precision, device, artifact), optimize)
    batch_sizes = sorted({1, max_batch_size})
    predictor.warm_up(batch_sizes)
    measured = predictor.choose(batch_sizes)
    if measured is not None:
        logger.info("SERVE_PRECISION=auto: %s", measured.describe())
    return predictor
