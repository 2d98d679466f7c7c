"""The inference server: FastAPI + uvicorn under SageMaker's hosting and batch contract."""

from __future__ import annotations

from container.serving.app import create_app
from container.serving.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
