"""The models a server holds, by name: each one's predictor, batcher and measured memory, loaded
off the event loop and unloaded with their memory given back, within a memory budget.

A single-model server holds one, loaded at start from /opt/ml/model. A multi-model endpoint
(SAGEMAKER_MULTI_MODEL=true) starts with none: SageMaker loads them with `POST /models`, lists
them with `GET /models`, reads one with `GET /models/{name}` and unloads it with
`DELETE /models/{name}` (docs/sagemaker-contract.md §5.7). Every model's forward passes run on
the one model thread, and each model's batcher keeps at most one batch there at a time, so the
batches of busy models take turns. Loading runs on a thread of its own: `/ping` and the other
models' requests go on meanwhile.

The budget is measured, not estimated: a load is refused with 507 when the memory the server
holds above what it held at start, plus the least a model has taken so far, would go over it; a
model whose load took the server over it is dropped again and refused likewise.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from container.abstention import Outputs
from container.serving.batcher import Batcher
from container.serving.errors import ConflictError, InsufficientMemoryError, NotFoundError
from container.serving.memory import release, resident_bytes
from container.serving.predictor import Predictor, load_predictor
from container.serving.settings import MiB, ServeSettings

__all__ = ["Hosted", "Models", "Page"]

logger = logging.getLogger(__name__)

_UNLOAD_WAIT_S = 0.01  # how often an unload looks whether the model's last request is answered


@dataclass
class Hosted:
    """One loaded model, ready to serve."""

    name: str
    url: str
    predictor: Predictor
    batcher: Batcher[torch.Tensor, Outputs]
    memory_bytes: int  # what loading it added to the server's resident memory
    load_s: float
    in_use: int = 0  # requests holding it now

    @contextmanager
    def used(self) -> Iterator[Predictor]:
        """The predictor, counted as in use while the block runs (an unload waits for it)."""
        self.in_use += 1
        try:
            yield self.predictor
        finally:
            self.in_use -= 1

    def describe(self) -> dict[str, Any]:
        """`GET /models/{name}`: the contract's two fields, then what was measured."""
        return {
            "modelName": self.name,
            "modelUrl": self.url,
            "modelVersion": self.predictor.model_version,
            "classes": len(self.predictor.classes),
            "form": self.predictor.form,
            "memoryMB": round(self.memory_bytes / MiB, 1),
            "loadSeconds": round(self.load_s, 2),
        }


@dataclass(frozen=True)
class Page:
    """One page of `GET /models`, and the token of the next one (None after the last)."""

    models: list[Hosted]
    next_token: str | None


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _after(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeError, ValueError):
        return ""  # not one of ours: list from the start


class Models:
    """The loaded models of one server process; every method runs on the event loop."""

    def __init__(
        self,
        settings: ServeSettings,
        model_thread: Executor,
        load_thread: Executor,
        max_batch_size: int,
        scratch: Path,
    ) -> None:
        self._settings = settings
        self._model_thread = model_thread
        self._load_thread = load_thread
        self._max_batch_size = max_batch_size
        self._scratch = scratch
        self._hosted: dict[str, Hosted] = {}
        self._loading: dict[str, asyncio.Future[Hosted]] = {}
        self._smallest = 0  # the least memory a model has taken so far
        self.baseline = resident_bytes()
        self.budget_bytes: int | None = None  # None: no budget (a single-model server)

    def __len__(self) -> int:
        return len(self._hosted)

    def __iter__(self) -> Iterator[Hosted]:
        return iter(list(self._hosted.values()))

    def used_bytes(self) -> int:
        """What the server holds now above what it held at start."""
        return max(0, resident_bytes() - self.baseline)

    def get(self, name: str) -> Hosted:
        """The loaded model called `name`; NotFoundError if there is none."""
        hosted = self._hosted.get(name)
        if hosted is None:
            raise NotFoundError(
                f"model '{name}' is not loaded; load it first with POST /models "
                '{"model_name": ..., "url": ...}'
            )
        return hosted

    def page(self, after_token: str | None, size: int) -> Page:
        """Up to `size` models in name order after the one `after_token` names."""
        after = _after(after_token) if after_token else ""
        names = sorted(n for n in self._hosted if n > after)
        shown = [self._hosted[n] for n in names[:size]]
        return Page(shown, _token(shown[-1].name) if len(names) > size else None)

    async def load(self, name: str, url: Path) -> Hosted:
        """Load the artifact at `url` (a folder or an archive, the layouts of /opt/ml/model) as
        `name`, warm it up and start its batcher. ConflictError if `name` is loaded or loading,
        NotFoundError if nothing is at `url`, InsufficientMemoryError over the budget; the
        loader's own errors (ArtifactError, PrecisionError, ...) as they are."""
        if name in self._hosted or name in self._loading:
            raise ConflictError(f"model '{name}' is already loaded; unload it first to replace it")
        if not url.exists():
            raise NotFoundError(f"nothing at {url} to load as model '{name}'")
        self._check_budget(name, self._smallest)
        future: asyncio.Future[Hosted] = asyncio.get_running_loop().create_future()
        self._loading[name] = future
        try:
            hosted = await self._load(name, url)
        except asyncio.CancelledError:  # the server stops
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a load nobody else waits for is not "never retrieved"
            raise
        else:
            future.set_result(hosted)
            return hosted
        finally:
            del self._loading[name]

    async def loaded(self, name: str, url: Path) -> Hosted:
        """The model `name`, loading it from `url` unless it is loaded or loading already."""
        if name in self._hosted:
            return self._hosted[name]
        if name in self._loading:
            return await asyncio.shield(self._loading[name])
        return await self.load(name, url)

    async def _load(self, name: str, url: Path) -> Hosted:
        started = time.monotonic()
        predictor, memory = await asyncio.get_running_loop().run_in_executor(
            self._load_thread, self._load_predictor, url, self._scratch_for(name)
        )
        try:
            self._check_budget(name, 0)
        except InsufficientMemoryError:
            del predictor
            await self._forget(name)
            raise
        self._smallest = min(self._smallest, memory) if self._hosted else memory
        batcher: Batcher[torch.Tensor, Outputs] = Batcher(
            predictor.predict,
            self._model_thread,
            self._max_batch_size,
            self._settings.max_batch_delay_ms / 1000,
        )
        batcher.start()
        hosted = Hosted(name, str(url), predictor, batcher, memory, time.monotonic() - started)
        self._hosted[name] = hosted
        logger.info(
            "Model '%s' loaded from %s in %.1f s: %d classes, model version %s, %s, %.0f MiB "
            "(%d models hold %.0f MiB%s)",
            name,
            url,
            hosted.load_s,
            len(predictor.classes),
            predictor.model_version,
            predictor.form,
            memory / MiB,
            len(self._hosted),
            self.used_bytes() / MiB,
            "" if self.budget_bytes is None else f" of {self.budget_bytes / MiB:.0f}",
        )
        return hosted

    def _load_predictor(self, url: Path, scratch: Path) -> tuple[Predictor, int]:
        """On the load thread: the predictor, and what it added to the resident memory."""
        before = resident_bytes()
        settings = self._settings
        predictor = load_predictor(
            url,
            scratch,
            settings.device,
            settings.precision,
            settings.optimization,
            self._max_batch_size,
        )
        release()  # what loading left behind (the forms not chosen) is not the model's
        return predictor, max(0, resident_bytes() - before)

    def _check_budget(self, name: str, more: int) -> None:
        if self.budget_bytes is None:
            return
        used = self.used_bytes()
        if used + more > self.budget_bytes:
            raise InsufficientMemoryError(
                f"model '{name}' does not fit: the {len(self)} loaded models hold "
                f"{used / MiB:.0f} MiB{f' and one takes {more / MiB:.0f} MiB' if more else ''}, "
                f"over the {self.budget_bytes / MiB:.0f} MiB budget (SERVE_MODELS_MEMORY_MB); "
                "unload a model and retry"
            )

    async def unload(self, name: str) -> float:
        """Stop serving `name` once its requests are answered (or SAGEMAKER_MODEL_SERVER_TIMEOUT
        has passed), then free its memory; the MiB it took. NotFoundError if it is not loaded."""
        hosted = self.get(name)
        del self._hosted[name]
        deadline = time.monotonic() + self._settings.timeout_s
        while hosted.in_use and time.monotonic() < deadline:
            await asyncio.sleep(_UNLOAD_WAIT_S)
        await hosted.batcher.stop()
        memory = hosted.memory_bytes
        del hosted
        await self._forget(name)
        logger.info(
            "Model '%s' unloaded: %.0f MiB given back (%d models hold %.0f MiB)",
            name,
            memory / MiB,
            len(self._hosted),
            self.used_bytes() / MiB,
        )
        return round(memory / MiB, 1)

    async def _forget(self, name: str) -> None:
        """Free what a model held: its unpacked archive, and its memory once no batch of it
        can still be running (the model thread takes its work in order)."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._model_thread, lambda: None)
        await loop.run_in_executor(self._load_thread, shutil.rmtree, self._scratch_for(name), True)
        await loop.run_in_executor(self._load_thread, release)

    def _scratch_for(self, name: str) -> Path:
        return self._scratch / hashlib.sha256(name.encode()).hexdigest()[:16]

    async def stop(self) -> None:
        for hosted in self._hosted.values():
            await hosted.batcher.stop()
