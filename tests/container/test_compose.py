"""docker-compose.yml end to end with compose v1 (Debian's): configure, train, then serve."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.container.conftest import BUILD_ARGS, docker, image_id, wait_for_ping

DEMO = {"epochs": 2, "batch_size": 16, "image_size": 32}  # the demo's settings, made quicker


@dataclass(frozen=True)
class Compose:
    """docker-compose on the repository's compose file, in a project of its own."""

    env: dict[str, str]
    opt_ml: Path
    port: int

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker-compose", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def inspect(self, service: str) -> dict[str, Any]:
        container = self("ps", "--quiet", service).stdout.strip()
        found: dict[str, Any] = json.loads(docker("inspect", container).stdout)[0]
        return found

    def exit_code(self, service: str) -> int:
        return int(self.inspect(service)["State"]["ExitCode"])

    def wait_until_serving(self) -> None:
        url = f"http://127.0.0.1:{self.port}"
        wait_for_ping(url, lambda: self("logs", "serve").stdout)


@pytest.fixture
def compose(image: str, tmp_path: Path) -> Iterator[Compose]:
    port = free_port()
    env = {
        **os.environ,
        **BUILD_ARGS,
        "COMPOSE_PROJECT_NAME": f"compose-test-{port}",
        "IMAGE": image,
        "OPT_ML": str(tmp_path / "opt_ml"),
        "PORT": str(port),
    }
    project = Compose(env, tmp_path / "opt_ml", port)
    yield project
    project("down", "--volumes")


def test_the_image_is_built_once_for_all_three_services(compose: Compose, image: str) -> None:
    """configure builds; train and serve run what it built. With the tests' build arguments the
    build is all cache hits: the image is the one the other tests run."""
    done = compose("build")
    assert done.returncode == 0, done.stderr
    built = [line for line in done.stderr.splitlines() if line.startswith("Building ")]
    assert built == ["Building configure"], done.stderr
    for name in ("train", "serve"):
        assert f"{name} uses an image, skipping" in done.stderr
    assert image_id(compose.env["IMAGE"]) == image_id(image)


def test_up_trains_on_a_generated_sample_then_serves_it_read_only(compose: Compose) -> None:
    compose.env["HYPERPARAMETERS"] = json.dumps(DEMO)
    up = compose("up", "--detach", "--no-build")
    assert up.returncode == 0, up.stderr
    assert compose.exit_code("configure") == 0
    assert compose.exit_code("train") == 0
    assert (compose.opt_ml / "model" / "model.pt").is_file()
    hyperparameters = json.loads((compose.opt_ml / "input/config/hyperparameters.json").read_text())
    assert hyperparameters["epochs"] == "2"  # the settings, written as SageMaker writes them
    assert "pretrained" in hyperparameters  # and the demo's defaults beside them
    metric_lines = [x for x in compose("logs", "train").stdout.splitlines() if x.endswith(";")]
    assert any("final best_epoch=" in line for line in metric_lines)
    # serve sees the model alone and cannot write to it, as on SageMaker: it serves regardless.
    mounts = [(m["Destination"], m["RW"]) for m in compose.inspect("serve")["Mounts"]]
    assert mounts == [("/opt/ml/model", False)]

    with httpx.Client(base_url=f"http://127.0.0.1:{compose.port}", timeout=60) as client:
        compose.wait_until_serving()
        jpeg = next((compose.opt_ml / "input/data/test").rglob("*.jpg"))
        response = client.post(
            "/invocations", content=jpeg.read_bytes(), headers={"Content-Type": "image/jpeg"}
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["predictions"]) == 4

    stop = compose("stop", "serve")
    assert stop.returncode == 0, stop.stderr
    assert compose.exit_code("serve") == 0, compose("logs", "serve").stdout

    again = compose("up", "--detach", "--no-deps", "serve")  # the trained model, no training
    assert again.returncode == 0, again.stderr
    compose.wait_until_serving()


def test_a_failed_training_stops_the_flow_before_serve(compose: Compose) -> None:
    compose.env["HYPERPARAMETERS"] = json.dumps({**DEMO, "optimizer": "adam"})
    up = compose("up", "--detach", "--no-build")
    assert up.returncode != 0
    assert compose.exit_code("train") == 1
    failure = (compose.opt_ml / "output" / "failure").read_text()
    assert failure.startswith("ConfigError: Hyperparameter optimizer='adam' is invalid")
    assert compose("ps", "--quiet", "serve").stdout.strip() == ""


def test_the_gpu_file_reserves_gpus_for_train_and_serve(compose: Compose) -> None:
    files = ["-f", "docker-compose.yml", "-f", "docker-compose.gpu.yml"]
    done = compose(*files, "config")
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    gpus = [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    for name in ("train", "serve"):
        assert services[name]["deploy"]["resources"]["reservations"]["devices"] == gpus
    assert "deploy" not in services["configure"]
