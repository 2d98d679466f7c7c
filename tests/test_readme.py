"""The README's facts that come from code stay in step with the code."""

from __future__ import annotations

from pathlib import Path

from container.gpu_drivers import markdown_table as gpu_table
from container.serving.settings import markdown_table as serving_table
from container.training.hyperparameters import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_hyperparameter_table_matches_the_schema() -> None:
    assert markdown_table() in README.read_text()


def test_serving_settings_table_matches_the_settings() -> None:
    assert serving_table() in README.read_text()


def test_gpu_driver_table_matches_the_table_launch_uses() -> None:
    assert gpu_table() in README.read_text()
