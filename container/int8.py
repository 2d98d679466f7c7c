"""int8 inference: post-training static quantization of the network, shared by train and serve.

`train` calibrates the fp32 network on a few hundred of its training images (`calibrate`), checks
the int8 network against fp32 on the validation split (container/training/quantization.py) and,
when it passes that gate, stores the quantized state_dict in the artifact (model.INT8_FILE) with
the gate's numbers in model_meta.json under `int8`. `serve` rebuilds the same quantized graph
without data and loads that state_dict into it (`load`): no calibration at start, no pickled code.

The quantization is torch.ao's FX graph mode with the `x86` backend's default mapping: per-channel
symmetric int8 weights, per-tensor uint8 activations observed by histogram, BatchNorm folded into
the convolutions, every convolution and pooling in int8; it runs on any x86-64 CPU (faster with
VNNI or AMX). The classifier (`fc`) stays fp32: it is a few thousandths of the work, and the layer
whose rounding flips close calls (on a 16-class test model, top-1 agreement with fp32 rose from
97.2-98.4 % to 98.4-99.1 % with the same calibration images, at the same speed). The network
answers logits and pooled features (`WithFeatures`), the features dequantized to float32, so the
abstention scores read the int8 model's own features.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import fx
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

from container.abstention import Policy
from container.model import INT8_FILE, Artifact, ArtifactError, WithFeatures

__all__ = ["BACKEND", "META_KEY", "available", "calibrate", "load", "policy"]

BACKEND = "x86"
META_KEY = "int8"
"""model_meta.json's entry for the gate's result (`Int8Status.from_meta` reads it)."""


def _prepared(model: WithFeatures, image_size: int) -> fx.GraphModule:
    """A CPU fp32 copy of `model` with observers where activations are quantized."""
    torch.backends.quantized.engine = BACKEND
    example = (torch.zeros(1, 3, image_size, image_size),)
    fp32 = copy.deepcopy(model).float().cpu().eval()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao; its FX path is what runs here.
        warnings.simplefilter("ignore")
        mapping = get_default_qconfig_mapping(BACKEND).set_module_name("fc", None)
        return prepare_fx(fp32, mapping, example)


def _converted(prepared: fx.GraphModule) -> fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_fx(prepared)


@torch.inference_mode()
def calibrate(
    model: WithFeatures, inputs: Iterable[torch.Tensor], image_size: int
) -> fx.GraphModule:
    """The int8 network, its activation ranges observed on `inputs` (normalised float32 CPU
    batches of `image_size` pixels square)."""
    prepared = _prepared(model, image_size)
    seen = 0
    for batch in inputs:
        prepared(batch)
        seen += len(batch)
    if not seen:
        raise ValueError("int8 calibration needs at least one image")
    return _converted(prepared)


def load(model: WithFeatures, state: Mapping[str, Any], image_size: int) -> fx.GraphModule:
    """The int8 network `calibrate` made, from its state_dict, without data; ArtifactError when
    the state does not fit the network (another architecture, another torch's quantization)."""
    quantized = _converted(_prepared(model, image_size))
    try:
        quantized.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise ArtifactError(f"the int8 weights do not fit the network: {first}") from exc
    return quantized.eval()


def available(artifact: Artifact) -> str | None:
    """None when the artifact may serve in int8; else why not, in words."""
    entry = artifact.meta.get(META_KEY)
    if entry is None:
        return (
            "the model has no int8 version (trained with int8=false, or by a version before "
            "int8 serving)"
        )
    if not entry.get("passed"):
        return f"the model's int8 version failed its gate at training: {entry.get('reason')}"
    if artifact.int8_state is None:
        return f"model_meta.json says the int8 gate passed, but {INT8_FILE} is missing"
    return None


def policy(artifact: Artifact) -> Policy:
    """The abstention policy for the int8 network's outputs: the artifact's, with the threshold
    and scales the gate measured on int8's own scores (abstention.matched)."""
    base = artifact.policy
    entry = artifact.meta.get(META_KEY) or {}
    if "abstention" not in entry:
        return base
    return Policy.from_meta(entry, base.gaussian)
