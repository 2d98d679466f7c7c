"""`serve`: SageMaker's hosting and batch-transform entry point (`docker run IMAGE serve`)."""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType

import uvicorn

from container.devices import describe_cuda
from container.serving.app import create_app
from container.serving.protocol import header_timeout_protocol
from container.serving.settings import ServeSettings, SettingsError

logger = logging.getLogger("container.serving")

# SageMaker sends SIGKILL 30 s after SIGTERM (docs/sagemaker-contract.md §5.1): in-flight requests
# get 25 s.
_GRACEFUL_SHUTDOWN_S = 25
# Longer than the idle timeout of SageMaker's front end (60 s), so that it closes connections
# first and never sends a request on one we are closing.
_KEEP_ALIVE_S = 75
# With several workers, uvicorn's supervisor kills a worker that does not answer its health ping
# in time (5 s by default); a worker loading and warming the model on a busy host can take longer,
# and was killed and restarted forever. A wedged worker still goes, and /ping says why before.
_WORKER_HEALTHCHECK_S = 120


def _after_shutdown(signum: int, frame: FrameType | None) -> None:
    logger.info("Shut down on %s", signal.Signals(signum).name)


def main() -> int:
    """Read the settings once, then run uvicorn (it handles SIGTERM: stop, drain, exit)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = ServeSettings.from_environ(os.environ)
    except SettingsError as exc:
        logger.error("Not serving: %s", exc)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    logger.info("Settings: %s", settings.describe())
    logger.info("Accelerator: %s", describe_cuda())
    common: dict[str, object] = {
        "host": "0.0.0.0",
        "port": settings.port,
        "loop": "uvloop",
        # httptools with a deadline on request headers; picklable for the worker processes.
        "http": header_timeout_protocol(settings.header_timeout_s),
        # Over it (open connections, idle keep-alive ones included, or requests in flight),
        # uvicorn answers 503 at once.
        "limit_concurrency": settings.max_connections,
        "log_config": None,
        "access_log": False,
        "timeout_keep_alive": _KEEP_ALIVE_S,
        "timeout_graceful_shutdown": _GRACEFUL_SHUTDOWN_S,
    }
    # uvicorn handles SIGTERM (stop accepting, finish in-flight requests, shut down) and then
    # re-raises it to whatever handler was installed before it; this one lets main return 0.
    signal.signal(signal.SIGTERM, _after_shutdown)
    if settings.workers == 1:
        uvicorn.Server(uvicorn.Config(create_app(settings), **common)).run()  # type: ignore[arg-type]
    else:
        uvicorn.run(
            "container.serving.app:app_from_environ",
            factory=True,
            workers=settings.workers,
            timeout_worker_healthcheck=_WORKER_HEALTHCHECK_S,
            **common,  # type: ignore[arg-type]
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
