"""uvicorn's httptools protocol with a deadline on request headers, against slow clients.

uvicorn times only the idle wait between requests (its keep-alive timer, armed when a response
ends and cancelled by the next byte): a connection that has sent nothing yet, or has sent part of
a request line or of the headers, is never timed. A client that connects and dribbles header bytes
(slowloris), or sends nothing at all, holds a socket for good, and every connection counts against
uvicorn's `limit_concurrency`, so a few hundred of them make every request a 503.

Which timer governs a connection, by what it is doing:

* fresh, nothing received: the header timer, armed in `connection_made` (as nginx's
  `client_header_timeout` and Go's `ReadHeaderTimeout` do);
* receiving a request's line and headers: the header timer; it runs from the first byte received
  while no request is in flight (or from the connection, for the first request), is total rather
  than per byte, and is disarmed when the headers are complete;
* receiving the body, or waiting for the answer: the app (its body timeout, its predictions
  timeout);
* idle between requests: uvicorn's keep-alive timer, unchanged (75 s, longer than SageMaker's
  front end's 60 s); the first byte of the next request cancels it and arms the header timer.

On expiry, a connection that has started a request gets a 408 with the usual JSON error body and
is closed; one that has sent nothing of a request is just closed. The header timer is only armed
while no response is in flight, so the 408 never interleaves with another response.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from asyncio import TimerHandle
from collections.abc import Callable
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from container.serving.errors import RequestTimeoutError

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol"]

logger = logging.getLogger(__name__)


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` that closes a connection whose request headers take too long."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        header_timeout_s: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s = header_timeout_s
        self._header_timer: TimerHandle | None = None
        # Between the first byte of a request line and the end of its headers.
        self._request_started = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        # Any byte while nothing is in flight starts the clock, even bytes that begin no request
        # (the parser skips CRLFs between requests): uvicorn cancels its keep-alive timer on every
        # byte, so without this a client sending "\r\n" now and then would never be timed.
        if self._idle():
            self._arm_header_timer()
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._request_started = True

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._request_started = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # A pipelined request that had begun but not finished its headers when this response
        # ended: uvicorn has just armed its keep-alive timer, but this client is mid-request.
        if self._request_started and self._idle() and not self.transport.is_closing():
            self._unset_keepalive_if_required()
            self._arm_header_timer()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.header_timeout_s, self._on_header_timeout
            )

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self._request_started:
            logger.warning(
                "408 to %s: its request headers took over %g s (SERVE_HEADER_TIMEOUT_S)",
                self.client,
                self.header_timeout_s,
            )
            self.transport.write(self._timeout_response())
        else:
            logger.debug("Closed a connection from %s that sent no request", self.client)
        self.transport.close()

    def _timeout_response(self) -> bytes:
        error = RequestTimeoutError(
            f"the request line and headers did not arrive within {self.header_timeout_s:g} s "
            "(SERVE_HEADER_TIMEOUT_S); send them at once"
        )
        body = json.dumps({"error": error.code, "message": error.message}).encode()
        lines = [STATUS_LINE[error.status]]
        lines += [
            name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers
        ]
        lines += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
        return b"".join(lines)


def header_timeout_protocol(header_timeout_s: float) -> Callable[..., HeaderTimeoutProtocol]:
    """The value for uvicorn's `http=`: `HeaderTimeoutProtocol` bound to the timeout.

    uvicorn calls `config.http` with keyword arguments for each connection (`Server.startup`), so
    any callable works where its annotation says a class. A `functools.partial` of this module's
    class pickles by reference plus the float, which is what `uvicorn.run(workers=N)` needs: it
    sends the `Config` to spawned worker processes. A subclass made at run time would not pickle,
    and a class attribute set by `main` would not survive the spawn.
    """
    return functools.partial(HeaderTimeoutProtocol, header_timeout_s=header_timeout_s)
