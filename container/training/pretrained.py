"""Where the starting weights come from, in order, and a clear failure when none can be found.

1. the `pretrained` channel, or the `pretrained_weights` hyperparameter (a path, or a file name in
   that channel): a state_dict file, or a model.tar.gz of an earlier job;
2. weights baked into the image at build time, in torch's hub cache (`$TORCH_HOME/hub/checkpoints`);
3. torchvision's download, when the network allows it (never under network isolation).

Asking for pretrained weights and getting none is an error, never a silent random init.
"""

from __future__ import annotations

import logging
import pickle
import socket
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision import models

from container.archives import ArchiveError, is_archive, unpack_once
from container.model import META_FILE, WEIGHTS_FILE
from container.sagemaker_env import Channel
from container.training.errors import WeightsError

__all__ = ["WeightsSource", "find_pretrained"]

logger = logging.getLogger(__name__)

_WEIGHTS_SUFFIXES = (".pt", ".pth")
_DOWNLOAD_TIMEOUT_S = 30.0
_IMAGENET_WEIGHTS: dict[str, models.WeightsEnum] = {
    "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet34": models.ResNet34_Weights.IMAGENET1K_V1,
    "resnet50": models.ResNet50_Weights.IMAGENET1K_V2,
}

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class WeightsSource:
    """Starting weights and a description of where they came from (for the log and the meta)."""

    state_dict: StateDict
    origin: str


def _read_state_dict(path: Path) -> StateDict:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
        raise WeightsError(f"pretrained weights {path} do not load as a state_dict: {exc}") from exc
    if isinstance(loaded, dict):
        for key in ("state_dict", "model"):  # training checkpoints wrap the weights
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise WeightsError(f"pretrained weights {path} hold no state_dict of tensors")
    return loaded


def _weights_in(folder: Path, scratch: Path) -> Path:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    archives = [p for p in files if is_archive(p)]
    if len(archives) == 1 and len(files) == 1:
        try:
            unpacked = unpack_once(archives[0], scratch / "pretrained")
        except ArchiveError as exc:
            raise WeightsError(str(exc)) from exc
        return _weights_in(unpacked, scratch)
    candidates = [p for p in files if p.suffix in _WEIGHTS_SUFFIXES]
    if any(p.name == META_FILE for p in files):  # an artifact: its weights, not its statistics
        candidates = [p for p in candidates if p.name == WEIGHTS_FILE]
    if len(candidates) != 1:
        raise WeightsError(
            f"the pretrained channel at {folder} must hold one .pt/.pth state_dict (or a "
            f"model.tar.gz with {WEIGHTS_FILE}); found {[p.name for p in files][:10]}. "
            "Name the file with the pretrained_weights hyperparameter"
        )
    return candidates[0]


def _user_weights(name: str | None, channel: Channel | None, scratch: Path) -> Path | None:
    if name is not None:
        path = Path(name)
        if not path.is_absolute() and channel is not None:
            path = channel.path / path
        if not path.is_file():
            raise WeightsError(
                f"pretrained_weights={name!r}: no such file ({path}); give an absolute path or "
                "a file name inside the pretrained channel"
            )
        return path
    if channel is not None:
        return _weights_in(channel.path, scratch)
    return None


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    # torch.hub's downloader has no timeout parameter; a firewalled network must fail fast.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def find_pretrained(
    arch: str,
    weights_name: str | None,
    channel: Channel | None,
    hub_dir: Path,
    scratch: Path,
) -> WeightsSource:
    """Starting weights for `arch` from the first source that has them (see module docs)."""
    user = _user_weights(weights_name, channel, scratch)
    if user is not None:
        return WeightsSource(_read_state_dict(user), f"file {user}")
    weights = _IMAGENET_WEIGHTS[arch]
    cache_dir = hub_dir / "checkpoints"
    baked = cache_dir / Path(weights.url).name
    if baked.is_file():
        return WeightsSource(_read_state_dict(baked), f"image's ImageNet weights {baked}")
    logger.info("No %s weights in %s; trying torchvision's download", arch, cache_dir)
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):
            state = torch.hub.load_state_dict_from_url(
                weights.url, model_dir=str(cache_dir), progress=False, check_hash=True
            )
    except (urllib.error.URLError, OSError, RuntimeError) as exc:
        raise WeightsError(
            f"pretrained=true but no {arch} weights were found: no pretrained channel, none "
            f"baked into the image ({baked}), and the download failed ({exc}). Add a "
            "'pretrained' channel holding an ImageNet state_dict, or set pretrained=false"
        ) from exc
    return WeightsSource(state, f"torchvision download of {weights.url}")
