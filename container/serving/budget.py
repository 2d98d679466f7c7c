"""What one request may cost, checked before the work starts; every refusal names its setting.

Counts and sizes come from what a body declares (a JSON list's length, a .npy header's shape, an
image file's header), so a request over its budget is refused with 413 before a pixel is decoded.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from container.invocations import MAX_PAYLOAD_MB
from container.serving.errors import PayloadTooLargeError
from container.serving.settings import ENVIRONMENT, ServeSettings

__all__ = ["DECODE_LIMIT_SETTINGS", "PixelTally", "RequestBudget", "over_limit"]

DECODE_LIMIT_SETTINGS = {
    "max_image_pixels": "max_image_pixels",
    "max_jpeg_scans": "max_jpeg_scans",
    "max_decode_bytes": "decode_memory_mb",
    "decode_timeout_s": "decode_timeout_s",  # the decoder pool's own limit
}
"""The limit an `ImageTooLargeError` names (a `container.decoding.DecodeLimits` field, or the
decoder pool's time budget) -> the `ServeSettings` field that sets it."""


_PER_PAYLOAD = (64, 100_000_000)
"""Images and pixels per request for each MAX_PAYLOAD_MB of payload cap, unless set."""


def over_limit(message: str, setting: str) -> PayloadTooLargeError:
    """A 413 whose message ends with the variable that raises the limit."""
    return PayloadTooLargeError(f"{message} ({ENVIRONMENT[setting]})")


def _mp(pixels: int) -> str:
    return f"{pixels / 1e6:.3g} MP"


@dataclass(frozen=True)
class RequestBudget:
    """Images per request, pixels per image and pixels per request."""

    max_images: int
    max_image_pixels: int
    max_request_pixels: int

    @classmethod
    def from_settings(cls, settings: ServeSettings) -> RequestBudget:
        """The settings' budget; what they leave unset grows with the payload cap from
        `_PER_PAYLOAD` (an asynchronous endpoint's 1 GB requests hold more images than a
        6 MB one's)."""
        scale = max(1.0, settings.max_payload_mb / MAX_PAYLOAD_MB)
        images, pixels = (round(scale * n) for n in _PER_PAYLOAD)
        return cls(
            settings.max_images or images,
            settings.max_image_pixels,
            settings.max_request_pixels or pixels,
        )

    def check_count(self, count: int) -> None:
        """PayloadTooLargeError when a request holds more images than allowed."""
        if count > self.max_images:
            raise over_limit(
                f"the request holds {count} images; the limit is {self.max_images} per request, "
                "send the rest in further requests",
                "max_images",
            )

    def check_image(self, name: str, width: int, height: int) -> None:
        """PayloadTooLargeError for one image over the per-image pixel limit."""
        if width * height > self.max_image_pixels:
            raise over_limit(
                f"{name} is {width}x{height} pixels ({_mp(width * height)}); the limit is "
                f"{_mp(self.max_image_pixels)} per image, send a smaller image",
                "max_image_pixels",
            )


class PixelTally:
    """A request's pixels so far; `add` refuses the image that would take it over the budget.

    Decoder threads call `add` as each image's header is read, so it is thread-safe. The one image
    of a single-image request cannot go over it alone (the per-image check stands), so decoders
    need not ask: `unasked_pixels` saves them the round trip.
    """

    def __init__(self, budget: RequestBudget, images: int) -> None:
        self._budget = budget
        self._total = 0
        self._lock = threading.Lock()
        self.unasked_pixels = (
            min(budget.max_request_pixels, budget.max_image_pixels) if images == 1 else 0
        )

    def add(self, name: str, width: int, height: int) -> None:
        self._budget.check_image(name, width, height)
        with self._lock:
            total = self._total + width * height
            if total > self._budget.max_request_pixels:
                raise over_limit(
                    f"with {name} ({width}x{height}) the request's images hold {_mp(total)}; "
                    f"the limit is {_mp(self._budget.max_request_pixels)} per request, send "
                    "fewer or smaller images per request",
                    "max_request_pixels",
                )
            self._total = total
