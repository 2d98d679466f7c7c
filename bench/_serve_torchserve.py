"""TorchServe as a server under test: the artifact archived for its `image_classifier` handler.

TorchServe runs from a venv of its own (it pins its own dependencies). The archive holds
`_serve_ts_model.py` (a ResNet-18 with 133 classes), the artifact's `model.pt` state_dict and an
`index_to_name.json` made from `classes.json`; the built-in handler opens the JPEG with PIL,
applies Resize(256) / CenterCrop(224) / ToTensor / Normalize, runs the fp32 eager model and
returns the softmax top 5. Everything else is TorchServe's default (workers: one per core;
batch size 1 with 100 ms delay unless `Batching` says otherwise), except that system metrics are
off: their collector starts a Python process every minute, which a 2-core host would feel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._serve_servers import Endpoint, free_ports, running, wait_until_serving
from container.model import CLASSES_FILE, WEIGHTS_FILE

__all__ = ["MODEL_NAME", "Batching", "archive", "torchserve", "unavailable", "version"]

MODEL_NAME = "resnet18"
_MODEL_FILE = Path(__file__).with_name("_serve_ts_model.py")
_JAVA = "java"


@dataclass(frozen=True)
class Batching:
    """TorchServe's server-side batching of a model: batchSize and maxBatchDelay."""

    size: int
    delay_ms: int

    @property
    def label(self) -> str:
        return f"batch {self.size}, {self.delay_ms} ms"


def _bin(venv: Path, name: str) -> Path:
    return venv / "bin" / name


def unavailable(venv: Path) -> str | None:
    """Why TorchServe cannot run here, or None when its venv and Java are in place."""
    for name in ("torchserve", "torch-model-archiver", "python"):
        if not _bin(venv, name).is_file():
            return f"{_bin(venv, name)} does not exist (no TorchServe venv at {venv})"
    if shutil.which(_JAVA) is None:
        return "TorchServe's frontend needs Java, and `java` is not on PATH"
    return None


def version(venv: Path) -> str:
    """The installed torchserve package's version, as its own venv reports it."""
    done = subprocess.run(
        [str(_bin(venv, "python")), "-c", "import ts.version; print(ts.version.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def archive(venv: Path, model_dir: Path, store: Path) -> None:
    """`torch-model-archiver`: the artifact in `model_dir` as `<store>/resnet18.mar`."""
    store.mkdir(parents=True, exist_ok=True)
    classes = json.loads((model_dir / CLASSES_FILE).read_text())
    names = store / "index_to_name.json"
    names.write_text(json.dumps({str(i): name for i, name in enumerate(classes)}))
    command = [
        str(_bin(venv, "torch-model-archiver")),
        "--model-name", MODEL_NAME,
        "--version", "1.0",
        "--model-file", str(_MODEL_FILE),
        "--serialized-file", str(model_dir / WEIGHTS_FILE),
        "--handler", "image_classifier",
        "--extra-files", str(names),
        "--export-path", str(store),
        "--force",
    ]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True)


def _config(work: Path, ports: list[int], batching: Batching | None) -> Path:
    inference, management, metrics = ports
    lines = [
        f"inference_address=http://127.0.0.1:{inference}",
        f"management_address=http://127.0.0.1:{management}",
        f"metrics_address=http://127.0.0.1:{metrics}",
        "disable_system_metrics=true",
        f"load_models={MODEL_NAME}.mar",
    ]
    if batching is not None:
        version = {
            "defaultVersion": True,
            "marName": f"{MODEL_NAME}.mar",
            "batchSize": batching.size,
            "maxBatchDelay": batching.delay_ms,
        }
        lines.append("models=" + json.dumps({MODEL_NAME: {"1.0": version}}))
    path = work / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def _describe(management_port: int) -> str:
    """Workers and batching of the model, as TorchServe's management API describes it."""
    response = httpx.get(f"http://127.0.0.1:{management_port}/models/{MODEL_NAME}", timeout=30)
    response.raise_for_status()
    model = response.json()[0]
    return (
        f"{len(model['workers'])} workers, batchSize {model['batchSize']}, "
        f"maxBatchDelay {model['maxBatchDelay']} ms"
    )


@contextmanager
def torchserve(
    venv: Path,
    store: Path,
    work: Path,
    batching: Batching | None,
    photo: bytes,
    threads_per_worker: int | None = None,
) -> Iterator[Endpoint]:
    """TorchServe serving the archive in `store`, stopped with `torchserve --stop` at the end.

    `threads_per_worker` sets OMP_NUM_THREADS for its workers (None: torch's default, all cores
    in every worker, which oversubscribes a host with more than one worker).
    """
    work.mkdir(parents=True, exist_ok=True)
    ports = free_ports(3)  # inference, management, metrics
    config = _config(work, ports, batching)
    # TorchServe writes its logs under the working directory unless these say where.
    env = {**os.environ, "LOG_LOCATION": str(work / "logs"), "METRICS_LOCATION": str(work / "logs")}
    if threads_per_worker is not None:
        env["OMP_NUM_THREADS"] = str(threads_per_worker)
    command = [
        str(_bin(venv, "torchserve")),
        "--start", "--foreground", "--ncs", "--disable-token-auth",
        "--model-store", str(store),
        "--ts-config", str(config),
    ]  # fmt: skip
    log = work / "torchserve.log"

    def stop() -> None:
        subprocess.run(
            [str(_bin(venv, "torchserve")), "--stop"], cwd=work, env=env, capture_output=True
        )

    with running(command, log=log, cwd=work, env=env, stop=stop) as process:
        url = f"http://127.0.0.1:{ports[0]}/predictions/{MODEL_NAME}"
        wait_until_serving(url, photo, process, log)
        yield Endpoint(url, _describe(ports[1]))
