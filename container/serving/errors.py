"""Errors the server answers with: each has an HTTP status and becomes `{"error", "message"}` JSON.

Clients see the message (SageMaker wraps a non-2xx answer in a ModelError carrying it), so it says
what was wrong with the request and what to send instead; it never carries a traceback.
"""

from __future__ import annotations

__all__ = [
    "BadRequestError",
    "ClientGoneError",
    "ConflictError",
    "InsufficientMemoryError",
    "NotAcceptableError",
    "NotFoundError",
    "NotReadyError",
    "OverloadedError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "ServingError",
    "UnsupportedMediaTypeError",
]


class ServingError(Exception):
    """Base: `status` is the HTTP status, `code` the short name in the JSON body."""

    status = 500
    code = "internal_error"
    headers: dict[str, str] = {}  # noqa: RUF012 - read-only, per class

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequestError(ServingError):
    """Raised for a body that does not hold usable images (corrupt, empty, malformed JSON, ...)."""

    status = 400
    code = "bad_request"


class NotFoundError(ServingError):
    """Raised for a model a multi-model endpoint has not loaded, or a model url with nothing."""

    status = 404
    code = "not_found"


class ConflictError(ServingError):
    """Raised for a load of a model name that is already loaded (or loading)."""

    status = 409
    code = "conflict"


class InsufficientMemoryError(ServingError):
    """Raised when a model does not fit the memory budget: SageMaker then unloads another
    model and retries."""

    status = 507
    code = "insufficient_memory"


class PayloadTooLargeError(ServingError):
    """Raised for a body over the payload cap (SAGEMAKER_MAX_PAYLOAD_IN_MB)."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(ServingError):
    """Raised for a Content-Type the server does not read."""

    status = 415
    code = "unsupported_media_type"


class NotAcceptableError(ServingError):
    """Raised for an Accept header naming no type the server writes."""

    status = 406
    code = "not_acceptable"


class NotReadyError(ServingError):
    """Raised while the model is loading, or after it failed to load."""

    status = 503
    code = "not_ready"


class RequestTimeoutError(ServingError):
    """Raised when a client does not send its body within SERVE_BODY_TIMEOUT_S seconds."""

    status = 408
    code = "request_timeout"


class OverloadedError(ServingError):
    """Raised when the queue is full, or predictions do not come back in time: try again soon."""

    status = 503
    code = "overloaded"
    headers = {"Retry-After": "1"}  # noqa: RUF012


class ClientGoneError(ServingError):
    """Raised when the client disconnects before its answer: its work is dropped. The status is
    nginx's 499, for the log line only; nobody is left to receive it."""

    status = 499
    code = "client_closed_request"
