"""The network and the model artifact that `train` writes and `serve` reads.

The artifact is a flat directory (SageMaker tars it into model.tar.gz as is):

- `model.pt`: a plain state_dict (tensors only; loaded with `weights_only=True`, no pickled code);
- `classes.json`: the class names, index i naming output i;
- `feature_stats.pt` (when trained with calibration): the feature statistics of the abstention
  policy's `mahalanobis` score, tensors only, like model.pt;
- `model_int8.pt` (when the int8 model passed its gate at training): the state_dict of the
  post-training quantized network (container/int8.py), tensors only, so the server loads it
  without calibration data;
- `model_meta.json`: architecture, preprocessing, metrics, versions and `model_version`, a content
  hash of the weights, the abstention policy, the int8 gate's result, written last so that a
  complete meta means a complete artifact.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from container.abstention import FeatureGaussian, Policy
from container.atomic import write_atomically, write_text_atomically
from container.decoding import Preprocessing

__all__ = [
    "ARCHITECTURES",
    "CLASSES_FILE",
    "FEATURE_STATS_FILE",
    "INT8_FILE",
    "META_FILE",
    "WEIGHTS_FILE",
    "Artifact",
    "ArtifactError",
    "WithFeatures",
    "backbone",
    "build",
    "load_artifact",
    "load_backbone_weights",
    "save_artifact",
]

WEIGHTS_FILE = "model.pt"
CLASSES_FILE = "classes.json"
META_FILE = "model_meta.json"
FEATURE_STATS_FILE = "feature_stats.pt"
INT8_FILE = "model_int8.pt"
FORMAT_VERSION = 1

ARCHITECTURES: dict[str, Callable[..., models.ResNet]] = {
    "resnet18": models.resnet18,
    "resnet34": models.resnet34,
    "resnet50": models.resnet50,
}

_HEAD_PREFIX = "fc."


class ArtifactError(Exception):
    """Raised when a model directory or a weights file cannot be used; says what was found."""


def build(arch: str, num_classes: int) -> models.ResNet:
    """A randomly initialised network with a `num_classes` head."""
    return ARCHITECTURES[arch](weights=None, num_classes=num_classes)


def backbone(model: models.ResNet) -> nn.Module:
    """The network up to its pooled features: the same modules (shared weights) minus the head."""
    layers = [module for name, module in model.named_children() if name != "fc"]
    return nn.Sequential(*layers, nn.Flatten())


class WithFeatures(nn.Module):
    """The network, answering its logits and the pooled features they are computed from (what
    serving runs, in every precision, and what int8 quantization converts)."""

    def __init__(self, model: models.ResNet) -> None:
        super().__init__()
        self.body = backbone(model)
        self.fc = model.fc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.fc(features), features


def load_backbone_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load every weight but the classification head, which is sized for our classes.

    Raises ArtifactError when the file is not weights for this architecture.
    """
    backbone = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIX)}
    try:
        missing, unexpected = model.load_state_dict(backbone, strict=False)
    except RuntimeError as exc:  # shapes that do not match
        first = str(exc).splitlines()[1:2] or [str(exc)]
        raise ArtifactError(
            f"weights do not fit {type(model).__name__}: {first[0].strip()} (is it the right "
            "architecture?)"
        ) from exc
    missing = [k for k in missing if not k.startswith(_HEAD_PREFIX)]
    if missing or unexpected:
        raise ArtifactError(
            f"weights do not fit {type(model).__name__}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (is it the right architecture?)"
        )


@dataclass(frozen=True)
class Artifact:
    """A loaded model artifact: the network in eval mode, its classes and its metadata."""

    model: nn.Module
    classes: list[str]
    meta: dict[str, Any]
    feature_stats: dict[str, torch.Tensor] | None = None
    int8_state: dict[str, Any] | None = None
    """The quantized network's state_dict (`INT8_FILE`), when it passed its gate."""

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_json(self.meta["preprocessing"])

    @property
    def model_version(self) -> str:
        return str(self.meta["model_version"])

    @property
    def policy(self) -> Policy:
        """Its calibration and abstention policy (the neutral one for older artifacts)."""
        stats = self.feature_stats
        return Policy.from_meta(self.meta, FeatureGaussian.from_tensors(stats) if stats else None)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _save_tensors(path: Path, tensors: Mapping[str, Any]) -> None:
    """Tensors (and what a quantized state_dict holds besides: dtypes, packed parameters, and
    the module versions in `_metadata` that its loading reads)."""
    on_cpu = OrderedDict(
        (k, v.detach().cpu() if isinstance(v, torch.Tensor) else v) for k, v in tensors.items()
    )
    if hasattr(tensors, "_metadata"):
        on_cpu._metadata = tensors._metadata  # type: ignore[attr-defined]
    write_atomically(path, lambda p: torch.save(on_cpu, p))


def save_artifact(
    model_dir: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    arch: str,
    classes: list[str],
    preprocessing: Preprocessing,
    extra_meta: Mapping[str, Any],
    feature_stats: Mapping[str, torch.Tensor] | None = None,
    int8_state: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the artifact into `model_dir` (each file atomically) and return its metadata."""
    model_dir.mkdir(parents=True, exist_ok=True)
    for name, tensors in ((FEATURE_STATS_FILE, feature_stats), (INT8_FILE, int8_state)):
        if tensors is not None:
            _save_tensors(model_dir / name, tensors)
        else:
            (model_dir / name).unlink(missing_ok=True)  # an earlier write's, not this model's
    weights = model_dir / WEIGHTS_FILE
    _save_tensors(weights, state_dict)
    sha = _sha256(weights)
    meta = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "num_classes": len(classes),
        "preprocessing": preprocessing.to_json(),
        "weights_sha256": sha,
        "model_version": f"{arch}-{sha[:12]}",
        **extra_meta,
    }
    write_text_atomically(model_dir / CLASSES_FILE, json.dumps(classes, indent=1))
    write_text_atomically(model_dir / META_FILE, json.dumps(meta, indent=2))
    return meta


def load_artifact(model_dir: Path, device: torch.device | str = "cpu") -> Artifact:
    """Load an artifact written by `save_artifact`; ArtifactError says what is wrong with it."""
    found = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else []
    for name in (WEIGHTS_FILE, CLASSES_FILE, META_FILE):
        if name not in found:
            raise ArtifactError(f"{model_dir} has no {name}; it holds {found or 'nothing'}")
    try:
        meta = json.loads((model_dir / META_FILE).read_text())
        classes = json.loads((model_dir / CLASSES_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read the metadata in {model_dir}: {exc}") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{model_dir / META_FILE} has format_version {meta.get('format_version')!r}, "
            f"this code reads {FORMAT_VERSION}"
        )
    if meta.get("arch") not in ARCHITECTURES or len(classes) != meta.get("num_classes"):
        raise ArtifactError(
            f"{model_dir}: arch {meta.get('arch')!r} with {len(classes)} classes in "
            f"{CLASSES_FILE} but num_classes={meta.get('num_classes')!r} in {META_FILE}"
        )
    # One more output than classes when it was trained with "none of these" (abstention.py).
    model = build(meta["arch"], len(classes) + Policy.from_meta(meta).unknown_output)
    try:
        state = torch.load(model_dir / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"{model_dir / WEIGHTS_FILE} does not load: {exc}") from exc
    return Artifact(
        model=model.to(device).eval(),
        classes=classes,
        meta=meta,
        feature_stats=_tensors(model_dir / FEATURE_STATS_FILE),
        int8_state=_tensors(model_dir / INT8_FILE),
    )


def _tensors(path: Path) -> dict[str, Any] | None:
    """An optional file of tensors (None when absent); ArtifactError when it does not load."""
    if not path.is_file():
        return None
    try:
        with warnings.catch_warnings():
            # Quantized tensors load through TypedStorage, which torch calls deprecated.
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise ArtifactError(f"{path} does not load: {exc}") from exc
