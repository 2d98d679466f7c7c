"""What `POST /invocations` speaks, in one place: the server reads it, `launch` sends by it.

Torch-free (and numpy-free) so that `launch` can import it on a laptop: the content type of each
file suffix, the one header SageMaker passes through, and the payload limit.
"""

from __future__ import annotations

__all__ = ["CUSTOM_ATTRIBUTES", "MAX_IN_FLIGHT_MB", "MAX_PAYLOAD_MB", "SUFFIX_MEDIA_TYPES"]

CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
"""The one request header SageMaker passes through to the container, and back on the response."""

MAX_PAYLOAD_MB = 6
"""SageMaker's limit on a request body (hosting; batch transform's default), in MB."""

MAX_IN_FLIGHT_MB = 100
"""Batch transform's limit on MaxConcurrentTransforms x MaxPayloadInMB."""

SUFFIX_MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png"}
"""The media type `launch` sends an image file as, by its (lower-case) suffix; the files of a
folder with another suffix are not sent."""
