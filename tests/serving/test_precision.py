"""The precision the server runs: int8 from the artifact alone, `auto` chosen by measurement,
explicit choices, and the clear error for an int8 that the model does not have.

(Top-1 parity of each precision with fp32 is tests/serving/test_parity.py's.)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from container.int8 import META_KEY
from container.model import INT8_FILE, META_FILE, load_artifact
from container.sagemaker_env import OptMl
from container.serving.predictor import PrecisionError, candidates
from tests.serving.conftest import App, in_process, serve_settings

AUTO = re.compile(
    r"SERVE_PRECISION=auto: measured ms per image at batch 1 and 16: (.*); serving (\w+)$"
)


def _model_only(trained: OptMl, base: Path, int8_meta: dict[str, object] | None = None) -> OptMl:
    """An /opt/ml tree holding only a copy of the trained model (no data to calibrate on);
    `int8_meta` replaces its int8 entry ({}: removed, with its weights, as an older version
    wrote it; passed=False: as a model that failed its gate is written)."""
    opt_ml = OptMl(base)
    shutil.copytree(trained.model_dir, opt_ml.model_dir)
    if int8_meta is not None:
        meta_file = opt_ml.model_dir / META_FILE
        meta = json.loads(meta_file.read_text())
        meta.pop(META_KEY)
        if int8_meta:
            meta[META_KEY] = {**meta.get(META_KEY, {}), **int8_meta}
        meta_file.write_text(json.dumps(meta))
        (opt_ml.model_dir / INT8_FILE).unlink()
    return opt_ml


def test_auto_measures_each_candidate_and_serves_the_fastest(app: App) -> None:
    [line] = app.log_lines(AUTO.pattern)
    match = AUTO.search(line)
    assert match is not None
    measured = dict(part.split(" ", 1) for part in match.group(1).split(", "))
    # This host's candidates: fp32 always, bf16 where the CPU has it, int8 (the model passed).
    assert {"fp32", "int8"} <= set(measured) <= {"fp32", "bf16", "int8"}
    per_image = {
        name: [float(ms) for ms in times.split(" and ")] for name, times in measured.items()
    }
    assert all(len(t) == 2 and min(t) > 0 for t in per_image.values())
    chosen = match.group(2)
    # The least time per image over both sizes (the log rounds to 0.01 ms: allow for it).
    product = {name: t[0] * t[1] for name, t in per_image.items()}
    assert product[chosen] <= min(product.values()) * 1.02
    assert app.log_lines(rf"Ready in .* TorchScript \(traced, frozen\) {chosen} on cpu")


def test_int8_loads_from_the_artifact_alone(trained: OptMl, tmp_path: Path) -> None:
    """A fresh server with the model and nothing else: no calibration at start."""
    opt_ml = _model_only(trained, tmp_path)
    assert not opt_ml.data_dir.exists()
    with in_process(serve_settings(opt_ml, precision="int8")) as app:
        app.wait_until(200)
        image = next(p for p in trained.channel_dir("test").rglob("*.jpg"))
        response = app.post(image.read_bytes())
        assert response.status_code == 200, response.text
        assert app.log_lines(r"Ready in .* int8 on cpu")


@pytest.mark.parametrize(
    ("int8_meta", "why"),
    [
        ({}, "the model has no int8 version (trained with int8=false, or by a version before"),
        (
            {"passed": False, "reason": "top-1 agreement with fp32 97.00% (at least 99.00%)"},
            "the model's int8 version failed its gate at training: top-1 agreement with fp32 "
            "97.00% (at least 99.00%)",
        ),
    ],
    ids=["older artifact", "failed gate"],
)
def test_a_model_without_usable_int8(
    trained: OptMl, tmp_path: Path, int8_meta: dict[str, object], why: str
) -> None:
    """auto serves without int8 and says why; SERVE_PRECISION=int8 is refused at start, with
    the reason on /ping and /invocations (503, for good) and in the log."""
    opt_ml = _model_only(trained, tmp_path, int8_meta)
    with in_process(serve_settings(opt_ml, precision="auto", max_batch_size=1)) as app:
        app.wait_until(200)
        assert app.log_lines(re.escape(f"SERVE_PRECISION=auto: no int8 ({why}"))
        [line] = app.log_lines(r"Ready in ")
        assert "int8" not in line
    with in_process(serve_settings(opt_ml, precision="int8")) as app:
        app.wait_until(503)
        message = f"SERVE_PRECISION=int8, but {why}"
        assert app.log_lines(re.escape(f"Not serving: {message}"))
        ping = app.client.get("/ping")
        assert ping.status_code == 503
        assert ping.json()["message"].startswith(message)
        assert ping.json()["message"].endswith("; set SERVE_PRECISION=auto or fp32")
        invocation = app.post(b"\xff\xd8")
        assert invocation.status_code == 503
        assert invocation.json()["message"] == ping.json()["message"]


def test_int8_is_refused_on_a_gpu(trained: OptMl) -> None:
    artifact = load_artifact(trained.model_dir)
    with pytest.raises(PrecisionError, match="int8 runs on the CPU only; set SERVE_DEVICE=cpu"):
        candidates("int8", torch.device("cuda"), artifact)


def test_explicit_precisions_are_served_as_asked(trained: OptMl) -> None:
    artifact = load_artifact(trained.model_dir)
    cpu = torch.device("cpu")
    for precision in ("fp32", "bf16", "int8"):
        assert candidates(precision, cpu, artifact) == [precision]
    assert candidates("fp16", cpu, artifact) == ["fp32"]  # fp16 is slow on CPUs: fp32, said
