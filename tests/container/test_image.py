"""As SageMaker and users run the image: `docker run IMAGE train`, `docker run -p 8080:8080 IMAGE`.

SageMaker adds `serve`; the bare command is the image's CMD, the same thing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import boto3
import httpx
import pytest

from container.gpu_drivers import IMAGE_CUDA_LABEL
from container.sagemaker_env import OptMl
from launch.image import Label, read_label
from tests.conftest import FAST, ROOT, Job
from tests.container.conftest import docker, serving

ENTRY_SCRIPTS = ["train", "serve", "push_to_ecr.sh", "docker/engine.sh", "docker/base-image.sh"]


@pytest.mark.parametrize("name", ENTRY_SCRIPTS)
def test_entry_scripts_have_lf_endings_and_run_bits(name: str) -> None:
    # CRLF gives "/usr/bin/env: 'python3\\r'"; a missing run bit gives "executable file not found".
    assert b"\r" not in (ROOT / name).read_bytes()
    staged = subprocess.run(
        ["git", "ls-files", "--stage", name], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert staged.stdout.startswith("100755 "), staged.stdout


def test_train_writes_the_artifact_reports_and_metric_lines(
    image: str, tmp_path: Path, dataset: Path
) -> None:
    """`docker run IMAGE train` on an /opt/ml tree; a failed training (the failure file) is in
    the compose tests."""
    job = Job(OptMl(tmp_path / "opt_ml"))
    shutil.copytree(dataset, job.opt_ml.data_dir)
    job.set_channels("train", "valid", "test")
    job.set_hyperparameters(FAST)
    done = docker("run", "--rm", "--volume", f"{job.base}:/opt/ml", image, "train", timeout=600)
    assert {p.name for p in job.opt_ml.model_dir.iterdir()} >= {
        "model.pt",
        "classes.json",
        "model_meta.json",
    }
    test_images = [p for p in job.opt_ml.channel_dir("test").rglob("*") if p.is_file()]
    assert job.report("evaluation.json")["splits"]["test"]["images"] == len(test_images)
    assert (job.opt_ml.output_data_dir / "profile.html").is_file()
    lines = [line for line in done.stdout.splitlines() if line.endswith(";")]
    assert [line.split()[0] for line in lines] == ["epoch=1", "epoch=2", "test", "final"]


def test_other_commands_pass_through_and_the_image_holds_only_what_runs(image: str) -> None:
    probe = "for c in gcc cc c++ make; do command -v $c; done; ls /opt/ml /root/.cache; echo end"
    done = docker("run", "--rm", image, "sh", "-c", probe)
    assert done.stdout.strip() == "end"  # no compiler, nothing in /opt/ml, no caches
    assert (
        "/opt/venv/bin/python3"
        in docker("run", "--rm", image, "sh", "-c", "command -v python3").stdout
    )
    config = json.loads(docker("inspect", "--format", "{{json .Config}}", image).stdout)
    for capability in ("accept-bind-to-port", "multi-models"):
        assert config["Labels"][f"com.amazonaws.sagemaker.capabilities.{capability}"] == "true"
    assert "PYTHONUNBUFFERED=1" in config["Env"]


def test_the_cuda_label_is_the_torch_inside_and_launch_reads_it(image: str) -> None:
    labels = json.loads(docker("inspect", "--format", "{{json .Config.Labels}}", image).stdout)
    inside = docker("run", "--rm", image, "python", "-c", "import torch; print(torch.version.cuda)")
    assert labels[IMAGE_CUDA_LABEL] == inside.stdout.strip()  # "13.0": PyPI's torch
    # From the local engine: no AWS call is made (the session has no endpoint or credentials).
    found = read_label(image, boto3.Session(region_name="us-east-1"))
    assert found == Label(labels[IMAGE_CUDA_LABEL], "its label in the local docker engine")


def test_the_bare_image_serves_jpegs_from_a_read_only_model_and_stops_cleanly(
    image: str, trained: OptMl
) -> None:
    """`docker run -p PORT:8080 IMAGE`, no command: the image's CMD is `serve` (SageMaker's own
    `IMAGE serve` runs in the local-mode tests). Only the model is mounted, read-only, as SageMaker
    hosts it: serving writes nothing there."""
    config = json.loads(docker("inspect", "--format", "{{json .Config}}", image).stdout)
    assert config["Cmd"] == ["serve"]
    model = f"{trained.model_dir}:/opt/ml/model:ro"
    with serving(image, "--volume", model) as (name, url):
        for jpeg in sorted(trained.channel_dir("test").rglob("*.jpg"))[:4]:
            response = httpx.post(
                f"{url}/invocations",
                content=jpeg.read_bytes(),
                headers={"Content-Type": "image/jpeg"},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            assert len(response.json()["predictions"]) == 4
        # The host-side CLI against the container, as a user checks a local image.
        folder = trained.channel_dir("test")
        invoked = subprocess.run(
            [sys.executable, "-m", "launch", "invoke", str(folder), "--url", url, "--top-k", "2"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
        )
        assert invoked.returncode == 0, invoked.stderr
        images = [p for p in folder.rglob("*") if p.suffix in (".jpg", ".jpeg", ".png")]
        assert invoked.stdout.count("  rank  label") == len(images)
        docker("stop", "--time", "30", name)  # then SIGKILL, which would make it 137
        state = json.loads(docker("inspect", "--format", "{{json .State}}", name).stdout)
        assert state["ExitCode"] == 0, docker("logs", name, check=False).stderr


def test_the_image_is_a_multi_model_endpoint_with_the_models_api(
    image: str, trained: OptMl, tmp_path: Path
) -> None:
    """SAGEMAKER_MULTI_MODEL=true and the models where SageMaker puts them,
    /opt/ml/models/NAME/model (one unpacked, one a model.tar.gz as a local run leaves it), driven
    through the API SageMaker calls, with the image's default settings."""
    packed = tmp_path / "packed"
    packed.mkdir()
    with tarfile.open(packed / "model.tar.gz", "w:gz") as tar:
        for path in sorted(trained.model_dir.iterdir()):
            tar.add(path, arcname=path.name)
    mounts = [
        f"{trained.model_dir}:/opt/ml/models/unpacked/model:ro",
        f"{packed}:/opt/ml/models/packed/model:ro",
    ]
    options = ["--env", "SAGEMAKER_MULTI_MODEL=true"]
    for mount in mounts:
        options += ["--volume", mount]
    jpeg = sorted(trained.channel_dir("test").rglob("*.jpg"))[0].read_bytes()
    with serving(image, *options) as (name, url), httpx.Client(base_url=url, timeout=120) as http:
        assert http.get("/models").json() == {"models": []}
        for model in ("unpacked", "packed"):
            body = {"model_name": model, "url": f"/opt/ml/models/{model}/model"}
            loaded = http.post("/models", json=body)
            assert loaded.status_code == 200, docker("logs", name, check=False).stderr
            answer = http.post(
                f"/models/{model}/invoke", content=jpeg, headers={"Content-Type": "image/jpeg"}
            )
            assert answer.status_code == 200
            assert len(answer.json()["predictions"]) == 4
        listed = [m["modelName"] for m in http.get("/models").json()["models"]]
        assert listed == ["packed", "unpacked"]
        assert http.delete("/models/packed").status_code == 200
        assert http.get("/models/packed").status_code == 404
        assert http.get("/ping").status_code == 200
