"""Metric lines and the regexes SageMaker (and the tuner) scrape them with."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from container.training import METRIC_DEFINITIONS, OBJECTIVE_METRIC
from container.training.metrics import METRIC_NAMES, format_line


def _scrape(line: str) -> dict[str, float]:
    found = {}
    for definition in METRIC_DEFINITIONS:
        match = re.search(definition["Regex"], line)
        if match:
            found[definition["Name"]] = float(match.group(1))
    return found


def test_definitions_fit_sagemaker_limits() -> None:
    assert len(METRIC_DEFINITIONS) <= 40
    for definition in METRIC_DEFINITIONS:
        assert len(definition["Name"]) <= 255
        assert len(definition["Regex"]) <= 500
        assert re.compile(definition["Regex"]).groups == 1
    assert OBJECTIVE_METRIC in {d["Name"] for d in METRIC_DEFINITIONS}


def test_epoch_line_has_the_contract_format_and_objective_last() -> None:
    line = format_line({"epoch": 3, "val_acc": 0.73421, "train_loss": 0.81234, "val_loss": 0.90121})
    assert line == "epoch=3 train_loss=0.812340 val_loss=0.901210 val_acc=0.734210;"
    assert _scrape(line) == {
        "epoch": 3,
        "train_loss": 0.81234,
        "val_loss": 0.90121,
        "val_acc": 0.73421,
    }


def test_keys_do_not_leak_into_each_other() -> None:
    line = format_line({"best_epoch": 7, "val_acc": 0.5}, prefix="final")
    assert line == "final best_epoch=7 val_acc=0.500000;"
    scraped = _scrape(line)
    assert "epoch" not in scraped  # `epoch=` must not match inside `best_epoch=`
    assert scraped == {"best_epoch": 7, "val_acc": 0.5}


def test_small_values_stay_plain_decimals() -> None:
    line = format_line({"lr": 1e-5})
    assert "e" not in line.split("=")[1]
    assert _scrape(line)["lr"] == pytest.approx(1e-5)


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no metric definition"):
        format_line({"accuracy": 1.0})


def test_every_name_has_a_definition() -> None:
    assert [d["Name"] for d in METRIC_DEFINITIONS] == list(METRIC_NAMES)


def test_the_regexes_import_without_torch() -> None:
    """`launch` (host side, no torch) imports METRIC_DEFINITIONS from the training package."""
    code = "import sys, container.training; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
