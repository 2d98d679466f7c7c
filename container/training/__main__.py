"""`train`: SageMaker's training entry point (`docker run IMAGE train`)."""

from __future__ import annotations

import functools
import logging
import os
import sys

from container.sagemaker_env import OptMl, write_failure
from container.training import distributed, job
from container.training.errors import TrainingError, failure_text
from container.training.settings import read_settings

logger = logging.getLogger("container.training")


def main() -> int:
    """Read the settings once, then run one training process per GPU (or one on CPU)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = read_settings(os.environ)
    except TrainingError as exc:
        logger.error("%s", exc)
        write_failure(OptMl.from_environ(os.environ), failure_text(exc))
        return 1
    run = functools.partial(job.run_process, settings)
    return distributed.run(settings.world, run, preload=(job.__name__,))


if __name__ == "__main__":
    sys.exit(main())
