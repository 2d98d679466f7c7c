"""SERVE_DEVICE on this machine, which has no NVIDIA driver: `cuda` keeps the real `serve` process
at 503 for good with the reason, `auto` and `cpu` serve on the CPU.

The other half of `auto` (a GPU present that CUDA cannot use: one ERROR line, then the CPU) needs
NVML to see a device; tests/test_devices.py checks that decision and its line from given values.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from container.sagemaker_env import OptMl
from tests.serving.conftest import jpeg, photo, start_server


def test_cuda_without_a_usable_gpu_is_503_for_good_with_the_reason(
    trained: OptMl, tmp_path: Path
) -> None:
    server = start_server(trained.base, tmp_path / "serve.log", {"SERVE_DEVICE": "cuda"})
    try:
        server.wait_until(503)
        deadline = time.monotonic() + 60
        while "Not serving" not in server.logs() and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(3):
            ping = server.client.get("/ping")
            assert ping.status_code == 503
            assert ping.json()["error"] == "not_ready"
            message = ping.json()["message"]
            for words in (
                "SERVE_DEVICE=cuda, but no usable GPU: no NVIDIA driver found",
                f"this image's torch is built for CUDA {torch.version.cuda}",
                f"CUDA {torch.version.cuda} needs NVIDIA driver",
                "InferenceAmiVersion=",
                "or SERVE_DEVICE=auto to serve on the CPU",
            ):
                assert words in message, message
        invocation = server.post(jpeg(photo()))
        assert invocation.status_code == 503
        assert invocation.json()["message"] == message
        (line,) = [line for line in server.logs().splitlines() if " ERROR " in line]
        assert f"Not serving: {message}" in line
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("device", ["auto", "CPU"])
def test_auto_and_cpu_serve_on_the_cpu(trained: OptMl, tmp_path: Path, device: str) -> None:
    server = start_server(trained.base, tmp_path / "serve.log", {"SERVE_DEVICE": device})
    try:
        server.wait_until(200)
        assert server.post(jpeg(photo())).status_code == 200
        logs = server.logs()
        assert f"SERVE_DEVICE={device.lower()}" in logs
        assert " on cpu, batches of up to 16" in logs
        assert " ERROR " not in logs  # no NVIDIA device here: nothing to warn about
    finally:
        assert server.stop() == 0
