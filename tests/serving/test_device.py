"""SERVE_DEVICE on this machine, which has no NVIDIA driver: `cuda` keeps the server (the app in
this process) at 503 for good with the reason, `auto` and `cpu` serve on the CPU.

The other half of `auto` (a GPU present that CUDA cannot use: one ERROR line, then the CPU) needs
NVML to see a device; tests/test_devices.py checks that decision and its line from given values.
"""

from __future__ import annotations

import torch

from container.sagemaker_env import OptMl
from tests.serving.conftest import QUICK, App, in_process, jpeg, photo, serve_settings


def test_cuda_without_a_usable_gpu_is_503_for_good_with_the_reason(trained: OptMl) -> None:
    with in_process(serve_settings(trained, device="cuda")) as app:
        (line,) = app.log_lines("Not serving")
        for _ in range(3):
            ping = app.client.get("/ping")
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
        invocation = app.post(jpeg(photo()))
        assert invocation.status_code == 503
        assert invocation.json()["message"] == message
        assert line == f"ERROR container.serving.state: Not serving: {message}"


def _serves_on_the_cpu(app: App, batches: object) -> None:
    assert app.post(jpeg(photo())).status_code == 200
    assert f" on cpu, batches of up to {batches}" in app.logs()
    assert "ERROR " not in app.logs()  # no NVIDIA device here: nothing to warn about


def test_auto_serves_on_the_cpu(app: App) -> None:
    """The shared app has the default settings: SERVE_DEVICE=auto, batches of up to 16."""
    _serves_on_the_cpu(app, 16)


def test_cpu_serves_on_the_cpu(trained: OptMl) -> None:
    with in_process(serve_settings(trained, device="cpu", **QUICK)) as app:
        app.wait_until(200)
        _serves_on_the_cpu(app, QUICK["max_batch_size"])
