"""`make run`: the quick start trains a demo model from nothing, then serves it on the port."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from container.class_names import class_name
from container.quickstart import DEMO_HYPERPARAMETERS, DOG_HYPERPARAMETERS, prepare
from container.sagemaker_env import OptMl, encode_hyperparameters, read_hyperparameters
from container.training.hyperparameters import Hyperparameters
from tests.conftest import ROOT, free_port
from tests.serving.conftest import QUICK_ENV, Server


def _quickstart(log: Path, *args: str) -> Server:
    """`make run`'s command; its server loads the model the quick way (the flow is the subject,
    tests/serving/test_lifecycle.py starts `serve` with the defaults)."""
    port = free_port()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "container.quickstart", *args, "--port", str(port)],
            cwd=ROOT,
            env={**os.environ, **QUICK_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return Server(process, port, log)


@pytest.mark.slow  # the demo model's training job
def test_from_nothing_to_a_served_demo_model_and_back_without_retraining(tmp_path: Path) -> None:
    opt_ml = tmp_path / "opt_ml"
    # Two of the demo's epochs and no int8 network: the flow is the subject here, not the model.
    changes = {"epochs": 2, "int8": False}
    quick = ("--opt-ml", str(opt_ml), "--hyperparameters", json.dumps(changes))
    server = _quickstart(tmp_path / "first.log", *quick)
    server.wait_until(200, timeout=900)
    written = json.loads(OptMl(opt_ml).hyperparameters_file.read_text())
    assert written == encode_hyperparameters({**DEMO_HYPERPARAMETERS, **changes})
    hint = re.search(r"Try: curl --data-binary @(\S+) -H 'Content-Type: image/jpeg'", server.logs())
    assert hint is not None, server.logs()
    response = server.post(Path(hint.group(1)).read_bytes())
    assert response.status_code == 200, response.text
    classes = {class_name(p.name) for p in (opt_ml / "input" / "data" / "train").iterdir()}
    assert {p["label"] for p in response.json()["predictions"]} <= classes
    assert server.stop() == 0
    assert "Training a model" in server.logs()

    again = _quickstart(tmp_path / "again.log", "--opt-ml", str(opt_ml))
    again.wait_until(200)
    assert again.post(Path(hint.group(1)).read_bytes()).status_code == 200
    assert again.stop() == 0
    assert "Training a model" not in again.logs()


def test_a_model_archive_is_served_as_it_is(trained: OptMl, tmp_path: Path) -> None:
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in trained.model_dir.iterdir():
            tar.add(path, arcname=path.name)
    server = _quickstart(tmp_path / "serve.log", str(archive), "--opt-ml", str(tmp_path / "t"))
    server.wait_until(200)
    image = next(trained.channel_dir("test").rglob("*.jpg")).read_bytes()
    response = server.post(image)
    assert response.status_code == 200, response.text
    assert server.stop() == 0
    assert "Training a model" not in server.logs()


def test_prepare_keeps_a_null_hyperparameter_null(dataset: Path, tmp_path: Path) -> None:
    """HYPERPARAMETERS='{"pretrained_weights": null}' (compose) means "no file", not "None"."""
    opt_ml = OptMl(tmp_path / "opt_ml")
    shutil.copytree(dataset / "train", opt_ml.channel_dir("train"))
    prepare(opt_ml.base, None, {"pretrained_weights": None, "pretrained": False})
    hp = read_hyperparameters(opt_ml, Hyperparameters)
    assert hp.pretrained_weights is None
    assert hp.pretrained is False


def test_prepare_configures_the_data_already_in_the_tree(dataset: Path, tmp_path: Path) -> None:
    opt_ml = OptMl(tmp_path / "opt_ml")
    shutil.copytree(dataset / "train", opt_ml.channel_dir("train"))
    shutil.copytree(dataset / "valid", opt_ml.channel_dir("valid"))
    prepare(opt_ml.base, None, {"epochs": 3, "lr": 0.003})
    assert json.loads(opt_ml.inputdataconfig_file.read_text()) == {
        "train": {"TrainingInputMode": "File"},
        "valid": {"TrainingInputMode": "File"},
    }
    written = json.loads(opt_ml.hyperparameters_file.read_text())
    assert written == {
        **encode_hyperparameters(DOG_HYPERPARAMETERS),
        "epochs": "3",
        "lr": "0.003",
    }


def test_prepare_without_a_train_folder_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "opt_ml" / "input" / "data" / "valid").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"input/data has no train/ folder"):
        prepare(tmp_path / "opt_ml", None, {})
