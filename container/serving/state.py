"""What one server process holds: its settings, its models, the model thread and the decoders,
and whether it can answer now.

A single-model server opens its socket at once and loads the model (and starts the decoder
processes) in the background: `/ping` says 503 with the reason until both are up, and for good
if the model fails to load. A multi-model endpoint starts with no model and answers `/ping` once
its decoders are up; SageMaker loads models into it (container/serving/hosted.py). After that
`/ping` is 200 only while the server can answer now: every batcher alive and not stalled, some
decoder free to work, nothing queued longer than SERVE_STALL_S, and (one model) not every recent
batch failing. It only reads state, so it answers in milliseconds however busy inference is.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from container.abstention import Override
from container.decoding import DecodeLimits
from container.devices import CudaUnusableError
from container.invocations import TARGET_MODEL
from container.model import ArtifactError
from container.serving.budget import RequestBudget
from container.serving.decode_worker import WorkerConfig
from container.serving.decoders import DecoderPool
from container.serving.errors import (
    BadRequestError,
    NotFoundError,
    NotReadyError,
    OverloadedError,
)
from container.serving.hosted import Hosted, Models
from container.serving.memory import container_limit_bytes
from container.serving.predictor import PrecisionError
from container.serving.settings import MiB, ServeSettings

__all__ = ["ServerState", "load_failure"]

logger = logging.getLogger(__name__)

_SCRATCH = Path("/tmp/serve-model")  # where a model.tar.gz is unpacked; /opt/ml/model is read-only

_QUEUED_BATCHES = 16  # the default queue per worker, in batches


def _default_batch_size(settings: ServeSettings) -> int:
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 64 if settings.device != "cpu" and torch.cuda.is_available() else 16


def _decoder_count(settings: ServeSettings) -> int:
    if settings.decoders is not None:
        return settings.decoders
    return max(2, len(os.sched_getaffinity(0)) // settings.workers)


_DEFAULT_MODEL = "model"  # what a single-model server calls its model
_BUDGET_SHARE = 0.9  # of the container's memory, for a multi-model endpoint's default budget


@dataclass
class ServerState:
    """The models (once loaded), the executors and the decoders of one server process."""

    settings: ServeSettings
    failure: str | None = None  # why the single model will never serve; safe to show clients
    max_batch_size: int = field(init=False)
    max_queued_images: int = field(init=False)
    queued_images: int = 0  # admitted and not yet answered

    def __post_init__(self) -> None:
        settings = self.settings
        self.max_batch_size = _default_batch_size(settings)
        self.max_queued_images = settings.max_queued_images or _QUEUED_BATCHES * self.max_batch_size
        self.budget = RequestBudget.from_settings(settings)
        # What a request that says nothing of abstention gets: the endpoint's settings.
        self.abstention = Override(settings.abstain, settings.min_confidence)
        # One thread runs every forward pass: batches form while it is busy. A multi-model
        # endpoint loads on a thread of its own, so that loading never holds up the others.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.load_thread = (
            ThreadPoolExecutor(1, thread_name_prefix="load")
            if settings.multi_model
            else self.model_thread
        )
        self.decoder_count = _decoder_count(settings)
        self.decoders = DecoderPool(
            self.decoder_count,
            WorkerConfig(
                DecodeLimits(
                    settings.max_image_pixels,
                    settings.max_jpeg_scans,
                    settings.decode_memory_mb * MiB,
                ),
                settings.decode_memory_mb * MiB,
                # An .npy body's pixels can be 3x its bytes (greyscale uint8 -> RGB).
                3 * settings.max_payload_bytes,
            ),
            settings.decode_timeout_s,
        )
        self.decoding = False  # the decoder processes are up
        self.models = Models(
            settings, self.model_thread, self.load_thread, self.max_batch_size, _SCRATCH
        )
        self._loading: asyncio.Task[None] | None = None

    async def start(self) -> None:
        settings = self.settings
        cpus = len(os.sched_getaffinity(0))
        torch.set_num_threads(settings.threads or max(1, cpus // settings.workers))
        if settings.multi_model:
            self.models.budget_bytes = self._memory_budget()
            await self._start_decoders()
            logger.info(
                "Multi-model endpoint ready: models load with POST /models, within %.0f MiB "
                "(SERVE_MODELS_MEMORY_MB); batches of up to %d, %d decoder processes, up to %d "
                "images queued",
                self.models.budget_bytes / MiB,
                self.max_batch_size,
                self.decoder_count,
                self.max_queued_images,
            )
            return
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="load-model")

    def _memory_budget(self) -> int:
        settings = self.settings
        if settings.models_memory_mb is not None:
            return settings.models_memory_mb * MiB
        decoders = self.decoder_count * settings.decode_memory_mb * MiB
        free = _BUDGET_SHARE * container_limit_bytes() - self.models.baseline - decoders
        return max(0, int(free))

    async def _start_decoders(self) -> None:
        await self.decoders.start()
        self.decoding = True

    async def _load(self) -> None:
        """A single-model server's model, from /opt/ml/model, and the decoders meanwhile."""
        started = time.monotonic()
        decoders = asyncio.get_running_loop().create_task(self._start_decoders())
        try:
            hosted = await self.models.load(_DEFAULT_MODEL, self.settings.opt_ml.model_dir)
        except (CudaUnusableError, PrecisionError, ArtifactError, NotFoundError) as exc:
            self.failure = load_failure(exc)
            return
        except Exception as exc:  # whatever it was, /ping must say 503 for good
            self.failure = f"loading the model failed ({type(exc).__name__}); see the server log"
            logger.exception("Not serving: loading the model failed")
            return
        finally:
            try:
                await decoders
            except asyncio.CancelledError:  # the server stops: so does their start; wait for it
                await asyncio.gather(decoders, return_exceptions=True)
                raise
        logger.info(
            "Ready in %.1f s: %d classes, model version %s, %s, batches of up to %d, "
            "%d decoder processes, up to %d images queued",
            time.monotonic() - started,
            len(hosted.predictor.classes),
            hosted.predictor.model_version,
            hosted.predictor.form,
            self.max_batch_size,
            self.decoder_count,
            self.max_queued_images,
        )

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            # Until it has unwound, the decoder processes it was starting may still be running.
            await asyncio.gather(self._loading, return_exceptions=True)
        await self.models.stop()
        await self.decoders.stop()
        self.model_thread.shutdown(wait=True, cancel_futures=True)
        self.load_thread.shutdown(wait=True, cancel_futures=True)

    def _starting(self) -> str | None:
        """Why requests cannot be taken yet (their model aside), or None."""
        if self.failure is not None:
            return self.failure
        if not self.settings.multi_model and not len(self.models):
            return "the model is still loading"
        if not self.decoding:
            return "the decoder processes are starting"
        return None

    def ready(self) -> None:
        """NotReadyError unless requests can be taken now (their model aside)."""
        reason = self._starting()
        if reason is not None:
            raise NotReadyError(reason if self.failure else f"{reason}; retry in a few seconds")

    async def model_for(self, name: str | None, target: str | None) -> Hosted:
        """The model a request is for: the single model; on a multi-model endpoint the one
        `name` (from the path) or else `target` (the target-model header) names, which the
        SDK's local mode sends to `/invocations` with the tarballs under /opt/ml/model: those
        are loaded on first use."""
        self.ready()
        if not self.settings.multi_model:
            return self.models.get(_DEFAULT_MODEL)
        if name is not None:
            return self.models.get(name)
        if not target:
            raise BadRequestError(
                f"this is a multi-model endpoint: name the model with the {TARGET_MODEL} header "
                "(InvokeEndpoint's TargetModel), or POST to /models/{name}/invoke"
            )
        local = _confined(self.settings.opt_ml.model_dir, target)
        if local is None or not local.exists():
            return self.models.get(target)
        return await self.models.loaded(target, local)

    def health(self) -> str | None:
        """None when a request would be answered now; else why not (what /ping says)."""
        reason = self._starting()
        if reason is not None:
            return reason
        stall_s = self.settings.stall_s
        multi = self.settings.multi_model
        for hosted in self.models:
            reason = hosted.batcher.health(stall_s, failing_counts=not multi)
            if reason is not None:
                return reason if not multi else f"model '{hosted.name}': {reason}"
        return self.decoders.health(stall_s)

    def refuse_if_full(self, images: int) -> None:
        """OverloadedError (503, Retry-After) when `images` more do not fit the queue (a request
        finds room in an empty queue whatever its size)."""
        if self.queued_images and self.queued_images + images > self.max_queued_images:
            raise OverloadedError(
                f"the server is busy ({self.queued_images} images queued; the limit is "
                f"{self.max_queued_images}, SERVE_MAX_QUEUED_IMAGES); retry shortly"
            )

    @contextmanager
    def admitted(self, images: int) -> Iterator[None]:
        """Hold `images` places in the queue while the block runs; see `refuse_if_full`."""
        self.refuse_if_full(images)
        self.queued_images += images
        try:
            yield
        finally:
            self.queued_images -= images


def load_failure(exc: Exception) -> str:
    """Why a model cannot serve, for clients; the details go to the log."""
    if isinstance(exc, CudaUnusableError):
        failure = (
            f"SERVE_DEVICE=cuda, but {exc}. {exc.probe.hosting_advice()}; "
            "or SERVE_DEVICE=auto to serve on the CPU"
        )
    elif isinstance(exc, PrecisionError):
        failure = str(exc)
    elif isinstance(exc, ArtifactError | NotFoundError):
        # What was found (paths, a listing) goes to the log, not to every client.
        logger.error("Not serving: the model cannot be loaded: %s", exc)
        return "the model artifact cannot be loaded; the server log says why"
    else:
        raise TypeError(exc)
    logger.error("Not serving: %s", failure)
    return failure


def _confined(root: Path, relative: str) -> Path | None:
    """`root / relative` when it is something inside `root` (not `root` itself), else None."""
    base, candidate = root.resolve(), (root / relative).resolve()
    return candidate if candidate != base and candidate.is_relative_to(base) else None
