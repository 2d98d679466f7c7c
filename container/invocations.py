"""What `POST /invocations` speaks, in one place: the server reads it, `launch` sends by it.

Torch-free (and numpy-free) so that `launch` can import it on a laptop: the content type of each
file suffix, the one header SageMaker passes through, and the payload limit.
"""

from __future__ import annotations

__all__ = [
    "CUSTOM_ATTRIBUTES",
    "MAX_ASYNC_PAYLOAD_MB",
    "MAX_IN_FLIGHT_MB",
    "MAX_PAYLOAD_MB",
    "SUFFIX_MEDIA_TYPES",
    "TARGET_MODEL",
]

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
"""The one request header SageMaker passes through to the container, and back on the response."""

TARGET_MODEL = "X-Amzn-SageMaker-Target-Model"
"""The header naming the model a multi-model endpoint's request is for (InvokeEndpoint's
TargetModel, such as `dog-breeds.tar.gz`); SageMaker sends it on every request to such an
endpoint, and the SDK's local mode on `/invocations`."""

MAX_PAYLOAD_MB = 6
"""SageMaker's limit on a request body (hosting; batch transform's default), in MB."""

MAX_ASYNC_PAYLOAD_MB = 1024
"""Asynchronous inference's limit on a request (an S3 object), in MB: the most the container's
payload cap may be raised to."""

MAX_IN_FLIGHT_MB = 100
"""Batch transform's limit on MaxConcurrentTransforms x MaxPayloadInMB."""

SUFFIX_MEDIA_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".zip": "application/zip",  # many images: one result each
    ".tar": "application/x-tar",
    ".tgz": "application/gzip",
    ".gz": "application/gzip",  # a .tar.gz
}
"""The media type `launch` sends a file as, by its (lower-case) suffix; the files of a folder with
another suffix are not sent."""
