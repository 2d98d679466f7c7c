"""The HTTP surface SageMaker talks to: `/ping`, `/invocations` and `/execution-parameters`.

The socket opens at once; the model loads on the model's thread in the background and `/ping` says
503 (with the reason) until it has loaded and run a warm-up batch, then 200; a model that fails to
load keeps it at 503 for good. `/ping` only reads that state, so it answers in milliseconds however
busy inference is. An invocation is parsed on the event loop, its images are decoded on a thread
pool in parallel, and their forward passes join whatever batch the batcher is gathering.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from container.devices import CudaUnusableError
from container.images import ImageDecodeError
from container.model import ArtifactError
from container.serving.batcher import Batcher, BatchResult
from container.serving.codecs import (
    ImageInput,
    RequestOptions,
    choose_response_type,
    encode,
    parse_custom_attributes,
    read_inputs,
)
from container.serving.errors import (
    BadRequestError,
    NotReadyError,
    OverloadedError,
    PayloadTooLargeError,
    ServingError,
)
from container.serving.predictor import Predictor, Prepared, load_predictor
from container.serving.settings import ServeSettings

__all__ = ["CUSTOM_ATTRIBUTES", "app_from_environ", "create_app"]

logger = logging.getLogger(__name__)

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
"""The one request header SageMaker forwards from the caller (and returns from us)."""

_SCRATCH = Path("/tmp/serve-model")  # where a model.tar.gz is unpacked; /opt/ml/model is read-only
_MAX_NAMED_ERRORS = 5


def _default_batch_size(settings: ServeSettings) -> int:
    if settings.max_batch_size is not None:
        return settings.max_batch_size
    return 64 if settings.device != "cpu" and torch.cuda.is_available() else 16


@dataclass
class ServerState:
    """The model (once loaded), the executors and the batcher of one server process."""

    settings: ServeSettings
    predictor: Predictor | None = None
    failure: str | None = None
    max_batch_size: int = field(init=False)

    def __post_init__(self) -> None:
        self.max_batch_size = _default_batch_size(self.settings)
        # One thread runs every forward pass: batches form while it is busy.
        self.model_thread = ThreadPoolExecutor(1, thread_name_prefix="model")
        self.decoders = ThreadPoolExecutor(
            max(2, len(os.sched_getaffinity(0))), thread_name_prefix="decode"
        )
        self.batcher: Batcher[torch.Tensor, torch.Tensor] = Batcher(
            self._predict,
            self.model_thread,
            self.max_batch_size,
            self.settings.max_batch_delay_ms / 1000,
        )
        self._loading: asyncio.Task[None] | None = None

    def _predict(self, batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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
            self.predictor = await asyncio.get_running_loop().run_in_executor(
                self.model_thread,
                load_predictor,
                settings.opt_ml.model_dir,
                _SCRATCH,
                settings.device,
                settings.precision,
                settings.optimize != "eager",
                self.max_batch_size,
            )
        except CudaUnusableError as exc:
            self.failure = (
                f"SERVE_DEVICE=cuda, but {exc}. {exc.probe.hosting_advice()}; "
                "or SERVE_DEVICE=auto to serve on the CPU"
            )
            logger.error("Not serving: %s", self.failure)
            return
        except ArtifactError as exc:
            self.failure = f"the model cannot be loaded: {exc}"
            logger.error("Not serving: %s", self.failure)
            return
        except Exception as exc:  # whatever it was, /ping must say 503 for good, with the reason
            self.failure = f"loading the model failed: {type(exc).__name__}: {exc}"
            logger.exception("Not serving: %s", self.failure)
            return
        predictor = self.predictor
        logger.info(
            "Ready in %.1f s: %d classes, model version %s, %s, batches of up to %d",
            time.monotonic() - started,
            len(predictor.classes),
            predictor.model_version,
            predictor.form,
            self.max_batch_size,
        )

    async def stop(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
        await self.batcher.stop()
        self.model_thread.shutdown(wait=True, cancel_futures=True)
        self.decoders.shutdown(wait=True, cancel_futures=True)

    def ready(self) -> Predictor:
        if self.predictor is not None:
            return self.predictor
        raise NotReadyError(self.failure or "the model is still loading; retry in a few seconds")


def _error(exc: ServingError, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, status_code=exc.status, headers=headers
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(
            f"the body is {int(declared)} bytes; the limit is {limit} bytes "
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
        options = parse_custom_attributes(headers.get(CUSTOM_ATTRIBUTES), self.settings.top_k)
        self.request_id = options.request_id or self.request_id
        media = choose_response_type(headers.get("accept"), self.settings.default_accept)
        predictor = self.state.ready()
        body = await _read_body(self.request, self.settings.max_payload_bytes)
        inputs, many = await read_inputs(headers.get("content-type"), body)
        self.timing.images = len(inputs)
        async with asyncio.timeout(self.settings.timeout_s):
            prepared = await self._prepare(predictor, inputs, options.explain)
            results = await asyncio.gather(*(self.state.batcher.submit(p.pixels) for p in prepared))
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
        self, predictor: Predictor, inputs: list[ImageInput], explain: bool
    ) -> list[Prepared]:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self.state.decoders,
                    predictor.prepare,
                    item,
                    self.settings.max_image_pixels,
                    explain,
                )
                for item in inputs
            ),
            return_exceptions=True,
        )
        self.timing.decode_s = time.monotonic() - started
        failed = [
            (item, o)
            for item, o in zip(inputs, outcomes, strict=True)
            if isinstance(o, BaseException)
        ]
        for _, outcome in failed:
            if not isinstance(outcome, ImageDecodeError):
                raise outcome
        if failed:
            named = "; ".join(f"{item.name}: {exc}" for item, exc in failed[:_MAX_NAMED_ERRORS])
            what = (
                "the image is" if len(inputs) == 1 else f"{len(failed)} of {len(inputs)} images are"
            )
            raise BadRequestError(f"{what} not usable: {named}")
        return [o for o in outcomes if isinstance(o, Prepared)]

    def _record(
        self,
        predictor: Predictor,
        prepared: Prepared,
        result: BatchResult[torch.Tensor],
        options: RequestOptions,
        many: bool,
    ) -> dict[str, Any]:
        self.timing.queue_s = max(self.timing.queue_s, result.queue_s)
        self.timing.model_s = max(self.timing.model_s, result.model_s)
        self.timing.batch_size = max(self.timing.batch_size, result.batch_size)
        top = result.value.topk(min(options.top_k, len(predictor.classes)))
        predictions = [
            {"label": predictor.classes[i], "index": i, "probability": round(p, 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        return (
            {"image": prepared.name, "predictions": predictions}
            if many
            else {"predictions": predictions}
        )

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
        """200 once the model is loaded and warmed up; 503 with the reason before, or for good."""
        if state.predictor is not None:
            return Response(status_code=200)
        return _error(NotReadyError(state.failure or "the model is still loading"), {})

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
        concurrency = min(state.max_batch_size * settings.workers, 100 // payload_mb)
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
