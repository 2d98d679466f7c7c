"""docker-compose.yml end to end with compose v1 (Debian's): configure, train, then serve."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import ROOT, _free_port
from tests.container.conftest import docker

DEMO = {"epochs": 2, "batch_size": 16}


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

    def exit_code(self, service: str) -> int:
        container = self("ps", "--quiet", service).stdout.strip()
        return int(docker("inspect", "--format", "{{.State.ExitCode}}", container).stdout)


@pytest.fixture
def compose(image: str, tmp_path: Path) -> Iterator[Compose]:
    port = _free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"compose-test-{port}",
        "IMAGE": image,
        "OPT_ML": str(tmp_path / "opt_ml"),
        "PORT": str(port),
    }
    project = Compose(env, tmp_path / "opt_ml", port)
    yield project
    project("down", "--volumes")


def test_up_trains_on_a_generated_sample_then_serves_it(compose: Compose) -> None:
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

    with httpx.Client(base_url=f"http://127.0.0.1:{compose.port}", timeout=60) as client:
        _wait_until_ready(client, compose)
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
        _wait_until_ready(client, compose)


def _wait_until_ready(client: httpx.Client, compose: Compose) -> None:
    status = None
    for _ in range(600):
        try:
            status = client.get("/ping").status_code
        except httpx.TransportError:
            status = None
        if status == 200:
            return
        time.sleep(0.2)
    raise AssertionError(f"/ping answered {status}:\n{compose('logs', 'serve').stdout}")


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
