"""Metric lines and the regexes SageMaker (and the tuner) scrape them with."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from container.training.metrics import (
    METRIC_DEFINITIONS,
    OBJECTIVE_METRIC,
    format_line,
)


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


@pytest.mark.parametrize(
    ("line", "scraped"),
    [
        ("epoch=3 lr=0.010000 val_acc=0.734210;", {"epoch": 3, "lr": 0.01, "val_acc": 0.73421}),
        ("test test_loss=1.5e-05 test_top5=1.000000;", {"test_loss": 1.5e-05, "test_top5": 1}),
        (
            "final best_epoch=7 val_loss=0.5 val_acc=0.5;",
            {"best_epoch": 7, "val_loss": 0.5, "val_acc": 0.5},
        ),
        # Log lines that name metrics without being metric lines.
        ("INFO container.training.epochs: Epoch 3/5: 8 steps, backbone frozen", {}),
        ("ConfigError: Hyperparameter lr='fast' is invalid", {}),
        ("Invalid: Value error, frozen_epochs=5 exceeds epochs=2.", {}),  # not `epoch=`
        ("Rule overfit fired at step 9: train_loss/val_loss ratio 0.2", {}),
        ("my_val_acc=0.9 lr_gamma=0.1 train_acc_top=0.3", {}),  # names inside other names
    ],
)
def test_what_the_regexes_scrape_from_hand_written_lines(
    line: str, scraped: dict[str, float]
) -> None:
    assert _scrape(line) == scraped


def test_the_regexes_import_without_torch() -> None:
    """`launch` (host side, no torch) imports METRIC_DEFINITIONS from the training package."""
    code = "import sys, container.training; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
