"""The HTTP surface SageMaker talks to: `/ping`, `/invocations` and `/execution-parameters`.

The socket opens at once; the model loads on the model's thread in the background and `/ping` says
503 (with the reason) until it has loaded and run a warm-up batch and the decoder processes are up;
a model that fails to load keeps it at 503 for good. After that `/ping` is 200 only while the
server can answer now: the batcher alive and not stalled, some decoder free to work, nothing queued
longer than SERVE_STALL_S, and not every recent batch failing. It only reads state, so it answers
in milliseconds however busy inference is.

An invocation is admitted only if the images it holds fit the worker's queue (else a fast 503 with
Retry-After); its body must arrive within SERVE_BODY_TIMEOUT_S; its images are decoded in the
decoder processes, each charged to the request's budget from its header first; their forward
passes join whatever batch the batcher is gathering. A client that disconnects cancels its work.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from container.abstention import Outputs, Override
from container.decoding import DecodeLimits, ImageDecodeError, ImageTooLargeError
from container.devices import CudaUnusableError
from container.invocations import CUSTOM_ATTRIBUTES, MAX_IN_FLIGHT_MB
from container.model import ArtifactError
from container.serving.batcher import Batcher, BatchResult
from container.serving.budget import DECODE_LIMIT_SETTINGS, PixelTally, RequestBudget, over_limit
from container.serving.codecs import (
    ImageInput,
    RequestOptions,
    choose_response_type,
    encode,
    parse_custom_attributes,
    read_inputs,
)
from container.serving.decode_worker import WorkerConfig
from container.serving.decoders import DecoderPool
from container.serving.errors import (
    BadRequestError,
    ClientGoneError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
)
from container.serving.predictor import PrecisionError, Predictor, Prepared, load_predictor
from container.serving.settings import MiB, ServeSettings

__all__ = ["app_from_environ", "create_app"]

logger = logging.getLogger(__name__)

_SCRATCH = Path("/tmp/serve-model")  # where a model.tar.gz is unpacked; /opt/ml/model is read-only
_MAX_NAMED_ERRORS = 5


_QUEUED_BATCHES = 16  # the default queue per worker, in batches


def _default_batch_size(settings: ServeSettings) -> int:
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 64 if settings.device != "cpu" and torch.cuda.is_available() else 16


def _decoder_count(settings: ServeSettings) -> int:
    if settings.decoders is not None:
        return settings.decoders
    return max(2, len(os.sched_getaffinity(0)) // settings.workers)


@dataclass
class ServerState:
    """The model (once loaded), the executors and the batcher of one server process."""

    settings: ServeSettings
    predictor: Predictor | None = None
    decoders: DecoderPool | None = None
    failure: str | None = None  # why the model will never serve; safe to show clients
    max_batch_size: int = field(init=False)
    max_queued_images: int = field(init=False)
    queued_images: int = 0  # admitted and not yet answered

    def __post_init__(self) -> None:
        self.max_batch_size = _default_batch_size(self.settings)
        self.max_queued_images = (
            self.settings.max_queued_images or _QUEUED_BATCHES * self.max_batch_size
        )
        self.budget = RequestBudget.from_settings(self.settings)
        # What a request that says nothing of abstention gets: the endpoint's settings.
        self.abstention = Override(self.settings.abstain, self.settings.min_confidence)
        # One thread runs every forward pass: batches form while it is busy.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.batcher: Batcher[torch.Tensor, Outputs] = Batcher(
            self._predict,
            self.model_thread,
            self.max_batch_size,
            self.settings.max_batch_delay_ms / 1000,
        )
        self._loading: asyncio.Task[None] | None = None

    def _predict(self, batch: Sequence[torch.Tensor]) -> list[Outputs]:
        assert self.predictor is not None
        return self.predictor.predict(batch)

    async def start(self) -> None:
        cpus = len(os.sched_getaffinity(0))
        torch.set_num_threads(self.settings.threads or max(1, cpus // self.settings.workers))
        self.batcher.start()
        self._loading = asyncio.get_running_loop().create_task(self._load(), name="load-model")

    async def _load(self) -> None:
        settings = self.settings
        started = time.monotonic()
        try:
            predictor = await asyncio.get_running_loop().run_in_executor(
                self.model_thread,
                load_predictor,
                settings.opt_ml.model_dir,
                _SCRATCH,
                settings.device,
                settings.precision,
                settings.optimize == "jit",
                self.max_batch_size,
            )
        except CudaUnusableError as exc:
            self.failure = (
                f"SERVE_DEVICE=cuda, but {exc}. {exc.probe.hosting_advice()}; "
                "or SERVE_DEVICE=auto to serve on the CPU"
            )
            logger.error("Not serving: %s", self.failure)
            return
        except PrecisionError as exc:
            self.failure = str(exc)
            logger.error("Not serving: %s", self.failure)
            return
        except ArtifactError as exc:
            # What was found (paths, a listing) goes to the log, not to every client.
            self.failure = "the model artifact cannot be loaded; the server log says why"
            logger.error("Not serving: the model cannot be loaded: %s", exc)
            return
        except Exception as exc:  # whatever it was, /ping must say 503 for good
            self.failure = f"loading the model failed ({type(exc).__name__}); see the server log"
            logger.exception("Not serving: loading the model failed")
            return
        decoder_count = _decoder_count(settings)
        decoders = DecoderPool(
            decoder_count,
            WorkerConfig(
                predictor.prep,
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
        await decoders.start()
        self.decoders, self.predictor = decoders, predictor
        logger.info(
            "Ready in %.1f s: %d classes, model version %s, %s, batches of up to %d, "
            "%d decoder processes, up to %d images queued",
            time.monotonic() - started,
            len(predictor.classes),
            predictor.model_version,
            predictor.form,
            self.max_batch_size,
            decoder_count,
            self.max_queued_images,
        )

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        await self.batcher.stop()
        if self.decoders is not None:
            await self.decoders.stop()
        self.model_thread.shutdown(wait=True, cancel_futures=True)

    def ready(self) -> tuple[Predictor, DecoderPool]:
        if self.predictor is not None and self.decoders is not None:
            return self.predictor, self.decoders
        raise NotReadyError(self.failure or "the model is still loading; retry in a few seconds")

    def health(self) -> str | None:
        """None when a request would be answered now; else why not (what /ping says)."""
        if self.predictor is None or self.decoders is None:
            return self.failure or "the model is still loading"
        stall_s = self.settings.stall_s
        return self.batcher.health(stall_s) or self.decoders.health(stall_s)

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


def _error(exc: ServingError, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(
        {"error": exc.code, "message": exc.message},
        status_code=exc.status,
        headers={**headers, **exc.headers},
    )


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body: 413 as soon as it is known to be over `limit` bytes, 408 if it is not all in
    within `timeout_s` seconds."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _receive_body(request, limit)
    except TimeoutError:
        raise RequestTimeoutError(
            f"the body did not arrive within {timeout_s:g} s (SERVE_BODY_TIMEOUT_S)"
        ) from None
    except ClientDisconnect:
        raise ClientGoneError("the client disconnected while sending the body") from None


@asynccontextmanager
async def _dropped_if_client_leaves(request: Request) -> AsyncIterator[None]:
    """Cancel the work inside when the client disconnects (ClientGoneError instead)."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        # With the body read, the server's next message for this request is the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch(), name="watch-client")
    try:
        yield
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        raise ClientGoneError("the client disconnected; its work was dropped") from None
    finally:
        watcher.cancel()


async def _receive_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    # (int() of thousands of digits is an error of its own: a 16-digit length is over anyway.)
    if declared.isascii() and declared.isdigit() and (len(declared) > 15 or int(declared) > limit):
        raise PayloadTooLargeError(
            f"the body is {declared[:16]} bytes; the limit is {limit} bytes "
            "(SAGEMAKER_MAX_PAYLOAD_IN_MB)"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLargeError(
                f"the body is over the {limit}-byte limit (SAGEMAKER_MAX_PAYLOAD_IN_MB)"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _payload(item: ImageInput) -> tuple[bytes, tuple[int, ...] | None]:
    """What a decoder is sent: encoded bytes (no shape), or RGB pixels and their shape."""
    if item.pixels is not None:
        return item.pixels.tobytes(), item.pixels.shape
    assert item.data is not None
    return item.data, None


@dataclass
class _Timing:
    decode_s: float = 0.0
    queue_s: float = 0.0
    model_s: float = 0.0
    batch_size: int = 0
    images: int = 0


class _Invocation:
    """One /invocations request, from headers to response; keeps what the log line reports."""

    def __init__(self, state: ServerState, request: Request) -> None:
        self.state = state
        self.request = request
        self.settings = state.settings
        self.timing = _Timing()
        self.request_id = uuid.uuid4().hex[:16]

    async def respond(self) -> Response:
        headers = self.request.headers
        options = parse_custom_attributes(
            headers.get(CUSTOM_ATTRIBUTES), self.settings.top_k, self.state.abstention
        )
        self.request_id = options.request_id or self.request_id
        media = choose_response_type(headers.get("accept"), self.settings.default_accept)
        predictor, decoders = self.state.ready()
        self.state.refuse_if_full(1)  # before reading a body there is no room for
        body = await _read_body(
            self.request, self.settings.max_payload_bytes, self.settings.body_timeout_s
        )
        inputs, many = await read_inputs(headers.get("content-type"), body, self.state.budget)
        del body  # the inputs hold what is needed of it
        self.timing.images = len(inputs)
        async with _dropped_if_client_leaves(self.request):
            with self.state.admitted(len(inputs)):
                async with asyncio.timeout(self.settings.timeout_s):
                    prepared = await self._prepare(decoders, inputs, options.explain)
                    results = await asyncio.gather(
                        *(self.state.batcher.submit(p.pixels) for p in prepared)
                    )
                    records = [
                        self._record(predictor, p, r, options, many)
                        for p, r in zip(prepared, results, strict=True)
                    ]
                    if options.explain:
                        await self._explain(predictor, prepared, records)
        payload = encode(records, media, many, {"model_version": predictor.model_version})
        return Response(payload, media_type=media, headers=self.headers())

    def headers(self) -> dict[str, str]:
        return {CUSTOM_ATTRIBUTES: f"request_id={self.request_id}"}

    async def _prepare(
        self, decoders: DecoderPool, inputs: list[ImageInput], explain: bool
    ) -> list[Prepared]:
        started = time.monotonic()
        tally = PixelTally(self.state.budget, len(inputs))
        outcomes = await asyncio.gather(
            *(decoders.decode(item.name, *_payload(item), explain, tally) for item in inputs),
            return_exceptions=True,
        )
        self.timing.decode_s = time.monotonic() - started
        failed = [
            (item, o)
            for item, o in zip(inputs, outcomes, strict=True)
            if isinstance(o, BaseException)
        ]
        for item, outcome in failed:
            if isinstance(outcome, ImageDecodeError) and outcome.detail:
                logger.info("invocation %s: %s: %s", self.request_id, item.name, outcome.detail)
        for _, outcome in failed:
            if isinstance(outcome, ServingError):  # the request's own budget
                raise outcome
            if not isinstance(outcome, ImageDecodeError):
                raise outcome
        too_large = [(item, o) for item, o in failed if isinstance(o, ImageTooLargeError)]
        if too_large:
            item, exc = too_large[0]
            setting = DECODE_LIMIT_SETTINGS[exc.limit]
            raise over_limit(f"{item.name}: {exc}", setting)
        if failed:
            named = "; ".join(f"{item.name}: {exc}" for item, exc in failed[:_MAX_NAMED_ERRORS])
            what = (
                "the image is" if len(inputs) == 1 else f"{len(failed)} of {len(inputs)} images are"
            )
            raise BadRequestError(f"{what} not usable: {named}")
        return [
            Prepared(item.name, torch.from_numpy(o.pixels), o.image)
            for item, o in zip(inputs, outcomes, strict=True)
            if not isinstance(o, BaseException)
        ]

    def _record(
        self,
        predictor: Predictor,
        prepared: Prepared,
        result: BatchResult[Outputs],
        options: RequestOptions,
        many: bool,
    ) -> dict[str, Any]:
        self.timing.queue_s = max(self.timing.queue_s, result.queue_s)
        self.timing.model_s = max(self.timing.model_s, result.model_s)
        self.timing.batch_size = max(self.timing.batch_size, result.batch_size)
        answer = predictor.answer(result.value, options.override)
        top = answer.probabilities.topk(min(options.top_k, len(predictor.classes)))
        predictions = [
            {"label": predictor.classes[i], "index": i, "probability": round(p, 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        record: dict[str, Any] = {"image": prepared.name} if many else {}
        record |= {"predictions": predictions, "abstained": answer.abstained}
        if answer.reason is not None:
            record["reason"] = answer.reason
        return record

    async def _explain(
        self, predictor: Predictor, prepared: list[Prepared], records: list[dict[str, Any]]
    ) -> None:
        loop = asyncio.get_running_loop()
        for item, record in zip(prepared, records, strict=True):
            top = record["predictions"][0]["index"]
            record["explanation"] = await loop.run_in_executor(
                self.state.model_thread, predictor.explain, item, top
            )

    def log(self, status: int, started: float) -> None:
        t = self.timing
        headers = self.request.headers
        logger.info(
            "invocation %s status=%d type=%s bytes=%s images=%d batch=%d decode=%.1fms "
            "queue=%.1fms model=%.1fms total=%.1fms",
            self.request_id,
            status,
            headers.get("content-type", "-"),
            headers.get("content-length", "-"),
            t.images,
            t.batch_size,
            t.decode_s * 1000,
            t.queue_s * 1000,
            t.model_s * 1000,
            (time.monotonic() - started) * 1000,
        )


def create_app(settings: ServeSettings) -> FastAPI:
    """The application for one server process."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.start()
        yield
        await state.stop()

    app = FastAPI(
        title="Image classifier (SageMaker container)",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.server = state

    @app.get("/ping")
    async def ping() -> Response:
        """200 while the server can answer now; 503 with the reason when it cannot."""
        reason = state.health()
        if reason is None:
            return Response(status_code=200)
        return _error(NotReadyError(reason), {})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        started = time.monotonic()
        invocation = _Invocation(state, request)
        try:
            response = await invocation.respond()
        except ServingError as exc:
            response = _error(exc, invocation.headers())
        except TimeoutError:
            response = _error(
                OverloadedError(
                    f"no prediction within {settings.timeout_s:g} s "
                    "(SAGEMAKER_MODEL_SERVER_TIMEOUT); the server is overloaded"
                ),
                invocation.headers(),
            )
        except Exception:
            logger.exception("invocation %s failed", invocation.request_id)
            response = _error(
                ServingError("an unexpected error occurred; it has been logged"),
                invocation.headers(),
            )
        invocation.log(response.status_code, started)
        return response

    @app.get("/execution-parameters")
    async def execution_parameters() -> dict[str, Any]:
        """What batch transform should send: one image per request, as many at once as one batch
        takes (the server's batcher then fills the model's batches).

        SingleRecord: a record here is an image file, and image bytes cannot be concatenated into
        one body (the SDK's local mode even fails on MultiRecord with unsplit binary files); a job
        over JSON Lines can still ask for MultiRecord with SplitType Line. The API's spelling,
        which local mode copies verbatim. SageMaker requires MaxConcurrentTransforms x
        MaxPayloadInMB <= 100.
        """
        payload_mb = math.ceil(settings.max_payload_mb)
        concurrency = min(state.max_batch_size * settings.workers, MAX_IN_FLIGHT_MB // payload_mb)
        return {
            "MaxConcurrentTransforms": settings.max_concurrent_transforms or concurrency,
            "BatchStrategy": "SingleRecord",
            "MaxPayloadInMB": payload_mb,
        }

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += (
                "; this server answers GET /ping, POST /invocations, GET /execution-parameters"
            )
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code)

    return app


def app_from_environ() -> FastAPI:
    """The factory each worker process calls when SAGEMAKER_MODEL_SERVER_WORKERS > 1."""
    return create_app(ServeSettings.from_environ(os.environ))
