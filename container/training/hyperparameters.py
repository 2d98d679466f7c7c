"""The training job's hyperparameters: names, types, defaults and meanings, in one schema.

Values arrive as strings in hyperparameters.json and are decoded by `sagemaker_env` (JSON if it
parses, lenient coercion); this schema is the single source for docs/training.md's table too.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BeforeValidator, Field, model_validator

from container.sagemaker_env import HyperparameterSchema

__all__ = ["Arch", "Hyperparameters"]


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


Arch = Literal["resnet18", "resnet34", "resnet50"]
_Choice = BeforeValidator(_lower)  # "SGD", "AdamW" and "Cosine" are what people type


class Hyperparameters(HyperparameterSchema):
    """Every knob of `train`; hyphens and underscores in names are interchangeable."""

    arch: Annotated[Arch, _Choice] = Field(
        "resnet18", description="Backbone: resnet18, resnet34 or resnet50."
    )
    pretrained: bool = Field(
        True,
        description="Start from ImageNet weights (the `pretrained` channel or "
        "`pretrained_weights`, else weights baked into the image, else torchvision's download); "
        "false = random init.",
    )
    pretrained_weights: str | None = Field(
        None,
        description="A state_dict file to start from: a path, or a file name in the `pretrained` "
        "channel.",
    )
    epochs: int = Field(10, ge=1, description="Passes over the training set.")
    batch_size: int = Field(32, ge=2, description="Images per step in each process.")
    optimizer: Annotated[Literal["sgd", "adamw"], _Choice] = Field(
        "sgd", description="sgd (Nesterov momentum) or adamw."
    )
    lr: float = Field(0.01, gt=0, description="Peak learning rate, reached after the warm-up.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(
        1e-4, ge=0, description="Weight decay (not applied to biases and BN)."
    )
    lr_schedule: Annotated[Literal["cosine", "step", "constant"], _Choice] = Field(
        "cosine", description="Decay after warm-up: cosine to zero, step, or constant."
    )
    lr_step_epochs: int = Field(7, ge=1, description="Step schedule: epochs between decays.")
    lr_gamma: float = Field(0.1, gt=0, le=1, description="Step schedule: factor at each decay.")
    warmup_epochs: float = Field(
        1.0, ge=0, description="Linear warm-up from lr/100, in epochs (fractions allowed)."
    )
    frozen_epochs: int = Field(
        0, ge=0, description="First epochs that train only the new head, backbone frozen."
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    augment: bool = Field(
        True, description="RandomResizedCrop + horizontal flip on training images."
    )
    image_size: int = Field(
        224, ge=32, le=1024, description="Input side in pixels; recorded in the model for serving."
    )
    device: Annotated[Literal["auto", "cuda", "cpu"], _Choice] = Field(
        "auto",
        description="auto: the GPU if CUDA can use it, else the CPU, but on a GPU instance type an "
        "unusable GPU fails the job at once; cuda: fail without a usable GPU; cpu: the CPU.",
    )
    mixed_precision: Annotated[Literal["auto", "off", "bf16", "fp16"], _Choice] = Field(
        "auto",
        description="auto: bf16 on GPUs and CPUs that support it, fp16 on older GPUs, else off.",
    )
    channels_last: bool = Field(True, description="Channels-last memory format (faster convs).")
    seed: int = Field(42, description="Seed for weights, shuffling and augmentation.")
    workers: int | Literal["auto"] = Field(
        "auto",
        description="Loader worker processes per process; auto: all CPUs but one on a GPU host "
        "(at most 8), one per 8 CPUs on a CPU host; fewer when /dev/shm is small.",
    )
    processes_per_host: int | Literal["auto"] = Field(
        "auto", description="Training processes per host; auto = one per GPU, or 1 on CPU."
    )
    check_steps: int | Literal["auto"] = Field(
        "auto",
        description="Steps between checks of the training loss (NaN or infinite fails the job) "
        "and, with several processes, between their agreements to stop (SIGTERM); each check "
        "waits for the GPU to finish its queued work. auto: every step on CPU, every 20 on GPU. "
        "A single process reads a stop signal after every step whatever this says.",
    )
    checkpoint_epochs: int = Field(
        1,
        ge=1,
        description="Epochs between checkpoints (last.pt); the last epoch and a stop (SIGTERM, "
        "spot interruption) always write one. Raise it when writing checkpoints takes a large "
        "share of short epochs (profile.json says).",
    )
    max_bad_images: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fraction of unreadable images per channel that is skipped before the job "
        "fails.",
    )
    debugger: Annotated[Literal["auto", "off"], _Choice] = Field(
        "auto", description="auto: SageMaker Debugger hook when debughookconfig.json exists."
    )
    save_tensors: bool = Field(
        False,
        description="Without a debughookconfig.json, record smdebug tensors anyway (losses every "
        "step, gradient norms at most 100 times: a few MB) to output/data/debug-tensors, which "
        "reaches S3 in output.tar.gz; a debughookconfig.json, when present, decides instead.",
    )

    abstain_rate: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="The most validation images (of the classes) the served model may decline to "
        "label: sets the abstention threshold. With an `unknown` channel the threshold may be "
        "lower, where that separates the unknown images better.",
    )
    abstain_accuracy: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Instead of `abstain_rate`: the accuracy wanted on the answers given; the "
        "threshold that reaches it on valid with the most answers (else `abstain_rate`).",
    )
    train_unknown: bool = Field(
        False,
        description='Train one more output, "none of these", on two thirds of the `unknown` '
        "channel; the server reports it as an abstention, never as a label.",
    )
    int8: bool = Field(
        True,
        description="Quantize the final model to int8 (calibrated on up to 512 training images) "
        "and ship it where it passes the gate below on valid; the server may then run it.",
    )
    int8_min_agreement: float = Field(
        0.99,
        ge=0,
        le=1,
        description="The int8 gate: the least share of validation images whose int8 top-1 "
        "equals fp32's.",
    )
    int8_max_accuracy_drop: float = Field(
        0.005,
        ge=0,
        le=1,
        description="The int8 gate: the most validation accuracy int8 may lose against fp32 "
        "(0.005: half a point).",
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> Hyperparameters:
        if self.frozen_epochs > self.epochs:
            raise ValueError(f"frozen_epochs={self.frozen_epochs} exceeds epochs={self.epochs}")
        for name, least in (("workers", 0), ("processes_per_host", 1), ("check_steps", 1)):
            value = getattr(self, name)
            if isinstance(value, int) and value < least:
                raise ValueError(f"{name}={value} is out of range")
        return self


def _type_name(annotation: Any) -> str:
    """`int`, `one of sgd, adamw`, `int or auto`, `str or none`: readable in a Markdown cell."""
    if get_origin(annotation) is Annotated:
        return _type_name(get_args(annotation)[0])
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(v) for v in get_args(annotation))
    if get_origin(annotation) in (Union, UnionType):
        return " or ".join(
            "none"
            if a is type(None)
            else ", ".join(map(str, get_args(a)))
            if get_origin(a) is Literal
            else _type_name(a)
            for a in get_args(annotation)
        )
    return str(getattr(annotation, "__name__", annotation))


def markdown_table() -> str:
    """docs/training.md's hyperparameter table, from this schema (`python -m` prints it)."""
    rows = ["| name | type | default | meaning |", "|---|---|---|---|"]
    for name, info in Hyperparameters.model_fields.items():
        default = "none" if info.default is None else str(info.default).lower()
        rows.append(
            f"| `{name}` | {_type_name(info.annotation)} | `{default}` | {info.description} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
