"""One invocation, from its headers to its response: `/invocations`, or a multi-model
endpoint's `/models/{name}/invoke`, which take exactly the same requests.

An invocation is admitted only if the images it holds fit the worker's queue (else a fast 503 with
Retry-After); its body must arrive within SERVE_BODY_TIMEOUT_S; its images are decoded in the
decoder processes, each charged to the request's budget from its header first; their forward
passes join whatever batch its model's batcher is gathering. An image of a multi-image request
that cannot be used gets an error record in its place; the others are answered. A client that
disconnects cancels its work. Every response carries Content-Length (never chunked: SageMaker's
asynchronous and batch paths need the length).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import torch
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from container.abstention import Outputs
from container.decoding import ImageDecodeError, ImageTooLargeError, Preprocessing
from container.invocations import CUSTOM_ATTRIBUTES, TARGET_MODEL
from container.serving.batcher import BatchResult
from container.serving.budget import DECODE_LIMIT_SETTINGS, PixelTally, over_limit
from container.serving.codecs import (
    ImageInput,
    RequestOptions,
    choose_response_type,
    encode,
    excerpt,
    parse_custom_attributes,
    read_inputs,
)
from container.serving.decoders import Decoded
from container.serving.errors import (
    BadRequestError,
    ClientGoneError,
    OverloadedError,
    PayloadTooLargeError,
    RequestTimeoutError,
    ServingError,
)
from container.serving.hosted import Hosted
from container.serving.predictor import Predictor, Prepared
from container.serving.state import ServerState

__all__ = ["Invocation", "error_response", "invoke", "read_body"]

logger = logging.getLogger(__name__)

_MAX_NAMED_ERRORS = 5


def error_response(exc: ServingError, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse(
        {"error": exc.code, "message": exc.message},
        status_code=exc.status,
        headers={**headers, **exc.headers},
    )


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
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


class Invocation:
    """One invocation, from headers to response; keeps what the log line reports."""

    def __init__(self, state: ServerState, request: Request, model: str | None = None) -> None:
        self.state = state
        self.request = request
        self.model = model  # named by the path (a multi-model endpoint's /models/{name}/invoke)
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
        hosted = await self.state.model_for(self.model, headers.get(TARGET_MODEL))
        self.state.refuse_if_full(1)  # before reading a body there is no room for
        body = await read_body(
            self.request, self.settings.max_payload_bytes, self.settings.body_timeout_s
        )
        inputs, many = await read_inputs(
            headers.get("content-type"), body, self.state.budget, self.settings.max_payload_bytes
        )
        del body  # the inputs hold what is needed of it
        self.timing.images = len(inputs)
        with hosted.used() as predictor:
            async with _dropped_if_client_leaves(self.request):
                # A request of thousands of images (an asynchronous endpoint's) holds one window
                # of the queue, not all of it, and the crops of one window at a time.
                window = self.state.max_queued_images
                with self.state.admitted(min(len(inputs), window)):
                    async with asyncio.timeout(self.settings.timeout_s):
                        tally = PixelTally(self.state.budget, len(inputs))
                        records: list[dict[str, Any]] = []
                        for start in range(0, len(inputs), window):
                            chunk = inputs[start : start + window]
                            records += await self._answer(hosted, chunk, tally, options)
        failed = [r["message"] for r in records if "error" in r]
        if len(failed) == len(inputs):
            named = "; ".join(failed[:_MAX_NAMED_ERRORS])
            what = "the image is" if len(inputs) == 1 else f"all {len(inputs)} images are"
            raise BadRequestError(f"{what} not usable: {named}")
        if many:
            records = [{"image": item.name, **r} for item, r in zip(inputs, records, strict=True)]
        payload = encode(records, media, many, {"model_version": predictor.model_version})
        return Response(payload, media_type=media, headers=self.headers())

    async def _answer(
        self,
        hosted: Hosted,
        inputs: list[ImageInput],
        tally: PixelTally,
        options: RequestOptions,
    ) -> list[dict[str, Any]]:
        """The records of `inputs` in order: predictions, or an error record for an image that
        cannot be used."""
        predictor = hosted.predictor
        outcomes = await self._prepare(predictor.prep, inputs, options.explain, tally)
        prepared = [o for o in outcomes if isinstance(o, Prepared)]
        results = await asyncio.gather(*(hosted.batcher.submit(p.pixels) for p in prepared))
        answered = [
            self._record(predictor, p, r, options) for p, r in zip(prepared, results, strict=True)
        ]
        if options.explain:
            await self._explain(predictor, prepared, answered)
        records = iter(answered)
        return [next(records) if isinstance(o, Prepared) else o for o in outcomes]

    def headers(self) -> dict[str, str]:
        return {CUSTOM_ATTRIBUTES: f"request_id={self.request_id}"}

    async def _prepare(
        self, prep: Preprocessing, inputs: list[ImageInput], explain: bool, tally: PixelTally
    ) -> list[Prepared | dict[str, Any]]:
        """Each image's crop, in order; an image that cannot be used is an error record in its
        place (an image over a size limit is a 413 for the request, naming the setting)."""
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(self._decode(item, explain, tally, prep) for item in inputs),
            return_exceptions=True,
        )
        self.timing.decode_s += time.monotonic() - started
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
        return [
            Prepared(item.name, torch.from_numpy(o.pixels), o.image)
            if isinstance(o, Decoded)
            else {"error": BadRequestError.code, "message": f"{item.name}: {o}"}
            for item, o in zip(inputs, outcomes, strict=True)
        ]

    async def _decode(
        self, item: ImageInput, explain: bool, tally: PixelTally, prep: Preprocessing
    ) -> Decoded:
        if item.error is not None:  # a member its archive could not give back
            raise ImageDecodeError(item.error)
        return await self.state.decoders.decode(item.name, *_payload(item), explain, tally, prep)

    def _record(
        self,
        predictor: Predictor,
        prepared: Prepared,
        result: BatchResult[Outputs],
        options: RequestOptions,
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
        record: dict[str, Any] = {"predictions": predictions, "abstained": answer.abstained}
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
        model = f" model_name={self.model or '-'}" if self.settings.multi_model else ""
        if TARGET_MODEL in headers:  # what SageMaker sends to a multi-model endpoint
            model += f" target={excerpt(headers[TARGET_MODEL], 200)}"
        logger.info(
            "invocation %s status=%d%s type=%s bytes=%s images=%d batch=%d decode=%.1fms "
            "queue=%.1fms model=%.1fms total=%.1fms",
            self.request_id,
            status,
            model,
            headers.get("content-type", "-"),
            headers.get("content-length", "-"),
            t.images,
            t.batch_size,
            t.decode_s * 1000,
            t.queue_s * 1000,
            t.model_s * 1000,
            (time.monotonic() - started) * 1000,
        )


async def invoke(state: ServerState, request: Request, model: str | None = None) -> Response:
    """Answer one invocation (of the model `model` names, on a multi-model endpoint's
    `/models/{name}/invoke`), and log it."""
    started = time.monotonic()
    invocation = Invocation(state, request, model)
    try:
        response = await invocation.respond()
    except ServingError as exc:
        response = error_response(exc, invocation.headers())
    except TimeoutError:
        response = error_response(
            OverloadedError(
                f"no prediction within {state.settings.timeout_s:g} s "
                "(SAGEMAKER_MODEL_SERVER_TIMEOUT); the server is overloaded"
            ),
            invocation.headers(),
        )
    except Exception:
        logger.exception("invocation %s failed", invocation.request_id)
        response = error_response(
            ServingError("an unexpected error occurred; it has been logged"),
            invocation.headers(),
        )
    invocation.log(response.status_code, started)
    return response
