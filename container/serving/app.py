"""The HTTP surface SageMaker talks to: `/ping`, `/invocations` and `/execution-parameters`, and
on a multi-model endpoint (SAGEMAKER_MULTI_MODEL=true) the `/models` API of its contract
(docs/sagemaker-contract.md §5.7).

What the server holds and when it is healthy is container/serving/state.py; one invocation,
container/serving/invocation.py; the models and their memory budget, container/serving/hosted.py.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from container.devices import CudaUnusableError
from container.invocations import MAX_IN_FLIGHT_MB
from container.model import ArtifactError
from container.serving.errors import BadRequestError, NotReadyError, ServingError
from container.serving.invocation import error_response, invoke, read_body
from container.serving.predictor import PrecisionError
from container.serving.settings import ServeSettings
from container.serving.state import ServerState, load_failure

__all__ = ["app_from_environ", "create_app"]

logger = logging.getLogger(__name__)

_LOAD_BODY_BYTES = 64 * 1024  # a load request is a model name and a path
_PAGE_SIZE = 100  # models per page of `GET /models` unless `limit` says otherwise
_MAX_PAGE_SIZE = 1000


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
    routes = ["GET /ping", "POST /invocations", "GET /execution-parameters"]

    @app.get("/ping")
    async def ping() -> Response:
        """200 while the server can answer now; 503 with the reason when it cannot."""
        reason = state.health()
        if reason is None:
            return Response(status_code=200)
        return error_response(NotReadyError(reason), {})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await invoke(state, request)

    @app.get("/execution-parameters")
    async def execution_parameters() -> dict[str, Any]:
        """What batch transform should send: one image per request, as many at once as one batch
        takes (the server's batcher then fills the model's batches).

        SingleRecord: a record here is an image file, and image bytes cannot be concatenated into
        one body (the SDK's local mode even fails on MultiRecord with unsplit binary files); a job
        over JSON Lines can still ask for MultiRecord with SplitType Line. The API's spelling,
        which local mode copies verbatim. SageMaker requires MaxConcurrentTransforms x
        MaxPayloadInMB <= 100 (a payload cap raised for asynchronous inference is not batch
        transform's: it is offered 100 MB at most).
        """
        payload_mb = min(math.ceil(settings.max_payload_mb), MAX_IN_FLIGHT_MB)
        concurrency = min(state.max_batch_size * settings.workers, MAX_IN_FLIGHT_MB // payload_mb)
        return {
            "MaxConcurrentTransforms": settings.max_concurrent_transforms or concurrency,
            "BatchStrategy": "SingleRecord",
            "MaxPayloadInMB": payload_mb,
        }

    if settings.multi_model:
        routes += _model_routes(app, state)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = f"{request.method} {request.url.path}: {exc.detail}"
        if exc.status_code == 404:
            message += f"; this server answers {', '.join(routes)}"
        return JSONResponse({"error": code, "message": message}, status_code=exc.status_code)

    return app


def _model_routes(app: FastAPI, state: ServerState) -> list[str]:
    """A multi-model endpoint's `/models` API; the routes it adds, for the 404 message."""

    @app.post("/models")
    async def load_model(request: Request) -> Response:
        """Load `{"model_name", "url"}`: 409 if that name is loaded, 404 if nothing is at `url`,
        400 if what is there is not a model, 507 if it does not fit the memory budget."""
        try:
            state.ready()
            name, url = _load_request(await read_body(request, _LOAD_BODY_BYTES, 30))
            hosted = await state.models.load(name, url)
        except ServingError as exc:
            return error_response(exc, {})
        except (ArtifactError, PrecisionError) as exc:
            return error_response(BadRequestError(f"model '{name}' cannot be loaded: {exc}"), {})
        except CudaUnusableError as exc:
            return error_response(ServingError(load_failure(exc)), {})
        except Exception:
            logger.exception("Loading model '%s' from %s failed", name, url)
            return error_response(
                ServingError(f"loading model '{name}' failed; the server log says why"), {}
            )
        return JSONResponse(hosted.describe())

    @app.get("/models")
    async def list_models(request: Request) -> Response:
        """The loaded models in name order, a page at a time: `nextPageToken` in the answer is
        the `next_page_token` of the next page, absent after the last."""
        query = request.query_params
        limit = query.get("limit", str(_PAGE_SIZE))
        if not (limit.isdigit() and 1 <= int(limit) <= _MAX_PAGE_SIZE):
            return error_response(
                BadRequestError(f"limit must be a whole number from 1 to {_MAX_PAGE_SIZE}"), {}
            )
        page = state.models.page(query.get("next_page_token"), int(limit))
        answer: dict[str, Any] = {"models": [m.describe() for m in page.models]}
        if page.next_token is not None:
            answer["nextPageToken"] = page.next_token
        return JSONResponse(answer)

    @app.get("/models/{name}")
    async def get_model(name: str) -> Response:
        try:
            return JSONResponse(state.models.get(name).describe())
        except ServingError as exc:
            return error_response(exc, {})

    @app.delete("/models/{name}")
    async def unload_model(name: str) -> Response:
        """Unload `name` once its requests are answered; its memory is given back before this
        answers."""
        try:
            freed = await state.models.unload(name)
        except ServingError as exc:
            return error_response(exc, {})
        return JSONResponse({"modelName": name, "unloaded": True, "memoryMB": freed})

    @app.post("/models/{name}/invoke")
    async def invoke_model(name: str, request: Request) -> Response:
        return await invoke(state, request, name)

    return [
        "POST /models",
        "GET /models",
        "GET /models/{name}",
        "DELETE /models/{name}",
        "POST /models/{name}/invoke",
    ]


def _load_request(body: bytes) -> tuple[str, Path]:
    """The model name and the path of a load request; BadRequestError says what is missing."""
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequestError(
            'the body is not JSON; send {"model_name": "NAME", "url": "/opt/ml/models/NAME/model"}'
        ) from exc
    if not isinstance(document, dict):
        document = {}
    name, url = document.get("model_name"), document.get("url")
    if not (isinstance(name, str) and name and len(name) <= 512 and name.isprintable()):
        raise BadRequestError("model_name must be a non-empty string of printable characters")
    if not (isinstance(url, str) and url.removeprefix("file://").startswith("/")):
        raise BadRequestError(
            "url must be the absolute path of the model's folder or archive, such as "
            "/opt/ml/models/NAME/model"
        )
    return name, Path(url.removeprefix("file://"))


def app_from_environ() -> FastAPI:
    """The factory each worker process calls when SAGEMAKER_MODEL_SERVER_WORKERS > 1."""
    return create_app(ServeSettings.from_environ(os.environ))
