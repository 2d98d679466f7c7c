"""The server's settings: read once from the environment at start-up, logged, then passed in.

SageMaker configures a model container only through `ContainerDefinition.Environment`
(docs/sagemaker-contract.md §5.5); the names it and the inference toolkits use are honoured, and our
own knobs use the `SERVE_` prefix.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from container.decoding import DEFAULT_MAX_IMAGE_PIXELS, DEFAULT_MAX_JPEG_SCANS
from container.invocations import MAX_ASYNC_PAYLOAD_MB, MAX_PAYLOAD_MB
from container.sagemaker_env import BASE_DIR_ENV, OptMl

__all__ = ["ENVIRONMENT", "ServeSettings", "SettingsError", "markdown_table"]

MiB = 1 << 20


class SettingsError(ValueError):
    """Raised when an environment variable holds a value the server cannot use."""


class ServeSettings(BaseModel):
    """Everything the server is told; one frozen object built at start-up."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_dir: str = Field(
        str(OptMl().base), description="The /opt/ml tree; the model is in model/."
    )
    port: int = Field(8080, ge=1, le=65535, description="Listening port (0.0.0.0).")
    workers: int = Field(1, ge=1, le=64, description="Server processes, each with a model copy.")
    timeout_s: float = Field(
        60, gt=0, description="Seconds a request may wait for its predictions before a 503."
    )
    default_accept: Literal["application/json", "application/jsonlines"] = Field(
        "application/json", description="Response type when Accept is missing or */*."
    )
    max_payload_mb: float = Field(
        MAX_PAYLOAD_MB,
        gt=0,
        le=MAX_ASYNC_PAYLOAD_MB,
        description="Largest request body, in MiB (an asynchronous endpoint's model may raise it "
        f"to {MAX_ASYNC_PAYLOAD_MB}); the per-request image and pixel budgets grow with it.",
    )
    max_concurrent_transforms: int | None = Field(
        None, ge=1, description="Batch transform's requests in flight, when the job sets it."
    )
    multi_model: bool = Field(
        False,
        description="Multi-model endpoint: no model at start, SageMaker loads and unloads them "
        "through `/models` (one worker process only).",
    )
    models_memory_mb: int | None = Field(
        None,
        ge=1,
        description="Multi-model endpoint: memory the loaded models may take together, in MiB; "
        "a load past it is refused with 507 (SageMaker then unloads a model and retries). "
        "Default: 90% of the container's memory (its cgroup limit, else the host's) less what "
        "the server holds at start, less each decoder process's SERVE_DECODE_MEMORY_MB.",
    )
    max_batch_size: int | None = Field(
        None, ge=1, le=512, description="Images per forward pass; default 16 on CPU, 64 on GPU."
    )
    max_batch_delay_ms: float = Field(
        0, ge=0, le=1000, description="How long a batch waits to fill once the model is free."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto",
        description="auto: the GPU if CUDA can use it, else the CPU (an ERROR line says why when a "
        "GPU is present); cuda: the GPU, else `/ping` answers 503 for good with the reason; cpu.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = Field(
        "auto",
        description="auto: time at warm-up every precision this host and model allow (CPU: "
        "fp32, bf16 where the CPU has native bf16, int8 where the model passed its int8 gate; "
        "GPU: fp16, bf16, fp32) and serve the fastest; the log says what was measured. int8 on "
        "a model without it, or on a GPU, is an error at start (`/ping` 503 with the reason).",
    )
    optimize: Literal["auto", "jit", "fused", "eager"] = Field(
        "auto",
        description="jit: traced and frozen TorchScript; fused: the eager module with "
        "BatchNorm folded into the convolutions (torch.fx), within a few per cent of jit and "
        "freed when unloaded, which TorchScript is not; eager: the plain module. auto: jit, and "
        "fused on a multi-model endpoint, whose models come and go.",
    )
    top_k: int = Field(5, ge=1, le=1000, description="Default number of classes returned.")
    abstain: bool = Field(
        True,
        description='Abstain (`"abstained": true` with a reason) where the model\'s trained '
        "threshold says the image is none of its classes; false: always answer. A request's "
        "`abstain=on` or `abstain=off` custom attribute wins.",
    )
    min_confidence: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Abstain when the calibrated top probability is below this, instead of the "
        "model's trained threshold; a request's `min_confidence=` custom attribute wins.",
    )
    max_images: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Images in one request (a JSON list, JSON Lines, .npy batch, multipart, "
        ".zip or .tar body); more is refused with 413 before any is decoded. Default: 64 per "
        f"{MAX_PAYLOAD_MB} MiB of SAGEMAKER_MAX_PAYLOAD_IN_MB.",
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_IMAGE_PIXELS,
        ge=1,
        description="Largest image, width x height from its header before any decoding (a "
        "JPEG's full size, not its reduced draft size); larger is refused with 413.",
    )
    max_request_pixels: int | None = Field(
        None,
        ge=1,
        description="Pixels of all the images of one request together, from their headers; "
        "an image that would go over is refused with 413 before it is decoded. Default: 100 "
        f"million per {MAX_PAYLOAD_MB} MiB of SAGEMAKER_MAX_PAYLOAD_IN_MB.",
    )
    max_jpeg_scans: int = Field(
        DEFAULT_MAX_JPEG_SCANS,
        ge=1,
        description="Scans of a progressive JPEG (each one walks the whole image again; "
        "encoders write about 10); more is refused with 413.",
    )
    decoders: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Decoder processes per worker; default: the CPUs / workers, at least 2.",
    )
    decode_timeout_s: float = Field(
        5,
        gt=0,
        description="Seconds one image may take to decode; its decoder process is "
        "then killed and replaced, and the request refused with 413.",
    )
    decode_memory_mb: int = Field(
        1024,
        ge=64,
        description="Memory of one decoder process, in MiB: an image whose header "
        "says it needs more is refused with 413, and a decoder that reaches it is replaced.",
    )
    max_queued_images: int | None = Field(
        None,
        ge=1,
        description="Images admitted and not yet answered, per worker; a request "
        "that would go over gets a fast 503 with Retry-After. Default: 16 batches.",
    )
    stall_s: float = Field(
        30,
        gt=0,
        description="`/ping` answers 503 while the oldest queued image, the running "
        "batch or a decode has waited longer than this.",
    )
    max_connections: int = Field(
        256,
        ge=1,
        description="Open connections (idle keep-alive ones too) or requests in flight, "
        "uvicorn's limit_concurrency; a request over it gets uvicorn's 503 at once.",
    )
    header_timeout_s: float = Field(
        10,
        gt=0,
        description="Seconds a client has to send a request's headers once it "
        "starts one; then the connection is closed.",
    )
    body_timeout_s: float = Field(
        30,
        gt=0,
        description="Seconds a client has to send the body once the headers are in; then 408.",
    )
    threads: int | None = Field(
        None, ge=1, description="Torch threads per worker; default: the CPUs / workers."
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level."
    )

    @model_validator(mode="after")
    def _one_worker_for_many_models(self) -> ServeSettings:
        if self.multi_model and self.workers > 1:
            raise ValueError(
                "a multi-model endpoint loads its models into one server process (SageMaker's "
                "load and invoke calls may reach any worker): set "
                "SAGEMAKER_MODEL_SERVER_WORKERS=1"
            )
        return self

    @property
    def opt_ml(self) -> OptMl:
        return OptMl(Path(self.base_dir))

    @property
    def optimization(self) -> Literal["jit", "fused", "eager"]:
        """What SERVE_OPTIMIZE=auto means here."""
        if self.optimize == "auto":
            return "fused" if self.multi_model else "jit"
        return self.optimize

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * MiB)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> ServeSettings:
        """Settings from the variables in `ENVIRONMENT`; SettingsError names a bad one."""
        values: dict[str, Any] = {}
        for name, variable in ENVIRONMENT.items():
            raw = environ.get(variable, "").strip()
            if raw:
                values[name] = raw.lower() if name in _CASE_INSENSITIVE else raw
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors()[0]
            if not first["loc"]:  # a rule across settings: its own message names them
                raise SettingsError(str(first["ctx"]["error"])) from exc
            name = str(first["loc"][0])
            raise SettingsError(
                f"{ENVIRONMENT[name]}={environ.get(ENVIRONMENT[name])!r} is invalid: {first['msg']}"
            ) from exc

    def describe(self) -> str:
        """One log line with every setting and the variable that sets it."""
        return ", ".join(f"{ENVIRONMENT[k]}={v}" for k, v in self.model_dump().items())


ENVIRONMENT: dict[str, str] = {
    "base_dir": BASE_DIR_ENV,
    "port": "SAGEMAKER_BIND_TO_PORT",
    "workers": "SAGEMAKER_MODEL_SERVER_WORKERS",
    "timeout_s": "SAGEMAKER_MODEL_SERVER_TIMEOUT",
    "default_accept": "SAGEMAKER_DEFAULT_INVOCATIONS_ACCEPT",
    "max_payload_mb": "SAGEMAKER_MAX_PAYLOAD_IN_MB",
    "max_concurrent_transforms": "SAGEMAKER_MAX_CONCURRENT_TRANSFORMS",
    "multi_model": "SAGEMAKER_MULTI_MODEL",
    "models_memory_mb": "SERVE_MODELS_MEMORY_MB",
    "max_batch_size": "SERVE_MAX_BATCH_SIZE",
    "max_batch_delay_ms": "SERVE_MAX_BATCH_DELAY_MS",
    "device": "SERVE_DEVICE",
    "precision": "SERVE_PRECISION",
    "optimize": "SERVE_OPTIMIZE",
    "top_k": "SERVE_TOP_K",
    "abstain": "SERVE_ABSTAIN",
    "min_confidence": "SERVE_MIN_CONFIDENCE",
    "max_images": "SERVE_MAX_IMAGES",
    "max_image_pixels": "SERVE_MAX_IMAGE_PIXELS",
    "max_request_pixels": "SERVE_MAX_REQUEST_PIXELS",
    "max_jpeg_scans": "SERVE_MAX_JPEG_SCANS",
    "decoders": "SERVE_DECODERS",
    "decode_timeout_s": "SERVE_DECODE_TIMEOUT_S",
    "decode_memory_mb": "SERVE_DECODE_MEMORY_MB",
    "max_queued_images": "SERVE_MAX_QUEUED_IMAGES",
    "stall_s": "SERVE_STALL_S",
    "max_connections": "SERVE_MAX_CONNECTIONS",
    "header_timeout_s": "SERVE_HEADER_TIMEOUT_S",
    "body_timeout_s": "SERVE_BODY_TIMEOUT_S",
    "threads": "SERVE_THREADS",
    "log_level": "SERVE_LOG_LEVEL",
}
"""Setting -> the environment variable that sets it (SageMaker's names first).

Batch transform also sends SAGEMAKER_BATCH and, when the job sets it, SAGEMAKER_BATCH_STRATEGY:
the server answers each request the same way under either strategy (a body is one image, or
JSON Lines of them), so they are not settings; SAGEMAKER_MAX_PAYLOAD_IN_MB and
SAGEMAKER_MAX_CONCURRENT_TRANSFORMS are, because they size the server.
"""

_CASE_INSENSITIVE = {
    "default_accept",
    "device",
    "precision",
    "optimize",
    "log_level",
}


def markdown_table() -> str:
    """docs/serving.md's settings table, from `ServeSettings` (`python -m` prints it)."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in ServeSettings.model_fields.items():
        default = "unset" if info.default is None else str(info.default).lower()
        rows.append(f"| `{ENVIRONMENT[name]}` | `{default}` | {info.description} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
