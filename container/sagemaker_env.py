"""SageMaker's /opt/ml contract: every path, config file and decoding rule in one place.

Everything SageMaker tells a container arrives as files under /opt/ml (docs/sagemaker-contract.md
§2.1); nothing useful arrives as `SM_*` variables because we do not ship the training toolkit. This
module reads those files into frozen, typed objects once, at the program's edge, so that no code
below it touches /opt/ml paths or the environment directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from container.atomic import write_text_atomically

__all__ = [
    "BASE_DIR_ENV",
    "DATA_CHANNELS",
    "DEBUG_TENSORS",
    "EVALUATION_HTML",
    "EVALUATION_JSON",
    "MAX_FAILURE_CHARS",
    "OPTIONAL_CHANNELS",
    "PRETRAINED_CHANNEL",
    "PROFILE_HTML",
    "PROFILE_JSON",
    "REQUIRED_CHANNELS",
    "UNKNOWN_CHANNEL",
    "Channel",
    "ConfigFileError",
    "HyperparameterSchema",
    "OptMl",
    "ResourceConfig",
    "decode_hyperparameter",
    "decode_hyperparameters",
    "encode_hyperparameters",
    "read_channels",
    "read_checkpoint_dir",
    "read_hyperparameters",
    "read_resource_config",
    "read_tensorboard_dir",
    "write_failure",
    "write_training_config",
]

logger = logging.getLogger(__name__)

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
"""Environment variable that moves the whole tree (the training toolkit's name for it)."""

MAX_FAILURE_CHARS = 1024
"""SageMaker copies this many characters of /opt/ml/output/failure into FailureReason."""

# What the job writes to output/data (SageMaker tars it into output.tar.gz), by name, so that
# `launch report` and the benchmarks read what `train` wrote.
EVALUATION_JSON = "evaluation.json"
EVALUATION_HTML = "evaluation.html"
PROFILE_JSON = "profile.json"
PROFILE_HTML = "profile.html"
DEBUG_TENSORS = "debug-tensors"
"""The job's own smdebug tensors (hyperparameter save_tensors), a folder."""

# Hyperparameters the SDK or the tuner inject for their own use (docs/sagemaker-contract.md §2.3).
_INJECTED_PREFIX = "sagemaker_"
_INJECTED_KEYS = frozenset({"_tuning_objective_metric"})


class HyperparameterSchema(BaseModel):
    """Base of a job's hyperparameter schema: the lenient coercion of
    docs/sagemaker-contract.md §2.3.

    Pydantic's lax mode already reads "12" and 12.0 as 12 and "True"/"yes"/"1" as true; numbers
    are also accepted where text is expected (a tuner may hand `123` for a name).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)


SchemaT = TypeVar("SchemaT", bound=HyperparameterSchema)


class ConfigFileError(Exception):
    """Raised when a config file SageMaker (or the user) wrote cannot be used as it is."""


@dataclass(frozen=True)
class OptMl:
    """The /opt/ml tree, rooted at `SAGEMAKER_BASE_DIR` (default /opt/ml)."""

    base: Path = Path("/opt/ml")

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> OptMl:
        return cls(Path(environ.get(BASE_DIR_ENV, "/opt/ml")))

    @property
    def config_dir(self) -> Path:
        return self.base / "input" / "config"

    @property
    def data_dir(self) -> Path:
        return self.base / "input" / "data"

    @property
    def hyperparameters_file(self) -> Path:
        return self.config_dir / "hyperparameters.json"

    @property
    def inputdataconfig_file(self) -> Path:
        return self.config_dir / "inputdataconfig.json"

    @property
    def resourceconfig_file(self) -> Path:
        return self.config_dir / "resourceconfig.json"

    @property
    def checkpointconfig_file(self) -> Path:
        return self.config_dir / "checkpointconfig.json"

    @property
    def debughookconfig_file(self) -> Path:
        return self.config_dir / "debughookconfig.json"

    @property
    def tensorboardoutputconfig_file(self) -> Path:
        return self.config_dir / "tensorboardoutputconfig.json"

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def output_data_dir(self) -> Path:
        """Tarred to output.tar.gz at the end of the job: reports go here."""
        return self.output_dir / "data"

    @property
    def debug_tensors_dir(self) -> Path:
        """Where the job's own smdebug hook writes (save_tensors, no DebugHookConfig): inside
        output/data, so the tensors reach S3 in output.tar.gz."""
        return self.output_data_dir / DEBUG_TENSORS

    @property
    def failure_file(self) -> Path:
        return self.output_dir / "failure"

    @property
    def default_checkpoint_dir(self) -> Path:
        return self.base / "checkpoints"

    @property
    def default_tensorboard_dir(self) -> Path:
        return self.output_dir / "tensorboard"

    def channel_dir(self, name: str) -> Path:
        return self.data_dir / name

    def rebase(self, path: Path) -> Path:
        """Map an absolute /opt/ml/... path from a config file into this tree."""
        try:
            return self.base / path.relative_to("/opt/ml")
        except ValueError:
            return path


def _read_json(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigFileError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "fix or remove the file"
        ) from exc


def _read_json_object(path: Path) -> dict[str, Any]:
    value = _read_json(path)
    if not isinstance(value, dict):
        raise ConfigFileError(f"{path} must hold a JSON object, found {type(value).__name__}")
    return value


# --- hyperparameters -------------------------------------------------------------------------


def encode_hyperparameters(values: Mapping[str, Any]) -> dict[str, str]:
    """Hyperparameters as SageMaker hands them over: every value a string, JSON unless a string.

    The SDK v2 does the same for framework estimators (`json.dumps` of non-strings), and
    `decode_hyperparameter` undoes it, so `None`, booleans, numbers and lists survive the round
    trip (`str(None)` would come back as the string "None"). Everything that writes
    hyperparameters.json or sends hyperparameters to a job encodes through here.
    """
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def decode_hyperparameter(raw: Any) -> Any:
    """Decode one value the way every SDK path can have encoded it
    (docs/sagemaker-contract.md §2.3).

    JSON if it parses (so `"\\"adam\\""` -> `adam`, `"0.1"` -> 0.1, `"[1, 2]"` -> [1, 2]), else the
    raw string (`"True"`, `"adam"`); the schema then coerces leniently.
    """
    if not isinstance(raw, str):
        return raw
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def decode_hyperparameters(raw: Mapping[str, Any], schema: type[SchemaT]) -> SchemaT:
    """Validate decoded hyperparameters against `schema`.

    Keys injected by the SDK or the tuner are dropped, unknown keys are warned about and dropped
    (a strict parser breaks tuning jobs), and `-` in names is read as `_` so that `batch-size` and
    `batch_size` are the same knob. A bad value raises ConfigFileError naming the key and the fix.
    """
    known = set(schema.model_fields)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key.startswith(_INJECTED_PREFIX) or key in _INJECTED_KEYS:
            logger.info(
                "Ignoring hyperparameter %s=%r set by SageMaker for its own use", key, value
            )
            continue
        name = key.replace("-", "_")
        if name not in known:
            logger.warning("Ignoring unknown hyperparameter %s=%r", key, value)
            continue
        values[name] = decode_hyperparameter(value)
    try:
        return schema.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else ""
        what = f"Hyperparameter {name}={values.get(name)!r} is invalid" if name else "Invalid"
        raise ConfigFileError(
            f"{what}: {first['msg']}. Fix it in the job's hyperparameters"
        ) from exc


def read_hyperparameters(opt_ml: OptMl, schema: type[SchemaT]) -> SchemaT:
    """hyperparameters.json (absent means all defaults) decoded into `schema`."""
    path = opt_ml.hyperparameters_file
    raw = _read_json_object(path) if path.exists() else {}
    return decode_hyperparameters(raw, schema)


# --- channels ----------------------------------------------------------------------------------

REQUIRED_CHANNELS = ("train", "valid")
"""The channels every training job of this image needs: ImageFolder trees with the same classes."""
OPTIONAL_CHANNELS = ("test",)
"""A held-out ImageFolder tree, scored once at the end when given."""
DATA_CHANNELS = (*REQUIRED_CHANNELS, *OPTIONAL_CHANNELS)
"""The dataset's channels, in the order `launch` uploads and names them."""
PRETRAINED_CHANNEL = "pretrained"
UNKNOWN_CHANNEL = "unknown"
"""Images of none of the classes (any folders): for the abstention threshold, and trained on as
"none of these" with `train_unknown=true`."""
"""Starting weights (a state_dict file or model.tar.gz) instead of the image's baked ones."""

InputMode = Literal["File", "FastFile", "Pipe"]


@dataclass(frozen=True)
class Channel:
    """One entry of inputdataconfig.json and the folder SageMaker put its data in."""

    name: str
    path: Path
    input_mode: InputMode = "File"
    s3_distribution_type: str = "FullyReplicated"


def read_channels(opt_ml: OptMl) -> dict[str, Channel]:
    """Channels named by inputdataconfig.json, never by listing the data folder.

    SageMaker can leave `<channel>-manifest` files beside the channel folders
    (docs/sagemaker-contract.md §2.2).
    """
    path = opt_ml.inputdataconfig_file
    if not path.exists():
        raise ConfigFileError(
            f"{path} is missing: SageMaker writes it; for a local run write one such as "
            '{"train": {}, "valid": {}} naming the folders under input/data'
        )
    channels: dict[str, Channel] = {}
    for name, spec in _read_json_object(path).items():
        if not isinstance(spec, dict):
            raise ConfigFileError(f"{path}: channel {name!r} must map to a JSON object")
        mode = spec.get("TrainingInputMode", "File")
        if mode not in ("File", "FastFile", "Pipe"):
            raise ConfigFileError(
                f"{path}: channel {name!r} has unknown TrainingInputMode {mode!r}"
            )
        channels[name] = Channel(
            name=name,
            path=opt_ml.channel_dir(name),
            input_mode=mode,
            s3_distribution_type=spec.get("S3DistributionType", "FullyReplicated"),
        )
    return channels


def write_training_config(
    opt_ml: OptMl, channels: Iterable[str], hyperparameters: Mapping[str, Any]
) -> None:
    """Write inputdataconfig.json and hyperparameters.json as SageMaker does for a training job:
    for the runs SageMaker does not set up (quickstart, the sample tree, the benchmarks)."""
    opt_ml.config_dir.mkdir(parents=True, exist_ok=True)
    config = {name: {"TrainingInputMode": "File"} for name in channels}
    opt_ml.inputdataconfig_file.write_text(json.dumps(config, indent=1), encoding="utf-8")
    values = encode_hyperparameters(hyperparameters)
    opt_ml.hyperparameters_file.write_text(json.dumps(values, indent=1), encoding="utf-8")


# --- resources ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResourceConfig:
    """resourceconfig.json: which host this is among the job's hosts, and its instance type."""

    current_host: str = "algo-1"
    hosts: tuple[str, ...] = field(default=("algo-1",))
    network_interface_name: str | None = None
    current_instance_type: str | None = None
    """This host's type: ml.g4dn.xlarge and the like on SageMaker, local or local_gpu in the
    SDK's local mode, None when the file does not say (a plain `docker run`)."""

    @property
    def host_rank(self) -> int:
        return self.hosts.index(self.current_host)

    @property
    def master_host(self) -> str:
        return self.hosts[0]


def read_resource_config(opt_ml: OptMl) -> ResourceConfig:
    """The job's hosts; a single local host when the file is absent (plain `docker run`)."""
    path = opt_ml.resourceconfig_file
    if not path.exists():
        return ResourceConfig()
    raw = _read_json_object(path)
    current, hosts = raw.get("current_host"), raw.get("hosts")
    if not isinstance(current, str) or not isinstance(hosts, list) or not hosts:
        raise ConfigFileError(f"{path} needs current_host (a string) and hosts (a non-empty list)")
    if current not in hosts:
        raise ConfigFileError(f"{path}: current_host {current!r} is not one of hosts {hosts}")
    return ResourceConfig(
        current_host=current,
        hosts=tuple(str(host) for host in hosts),
        network_interface_name=raw.get("network_interface_name"),
        current_instance_type=_optional_str(raw.get("current_instance_type")),
    )


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _local_path(opt_ml: OptMl, path: Path, default: Path) -> Path:
    if not path.exists():
        return default
    local = _read_json_object(path).get("LocalPath")
    return opt_ml.rebase(Path(local)) if isinstance(local, str) and local else default


def read_checkpoint_dir(opt_ml: OptMl) -> Path:
    """checkpointconfig.json's LocalPath, else /opt/ml/checkpoints (SageMaker's default)."""
    return _local_path(opt_ml, opt_ml.checkpointconfig_file, opt_ml.default_checkpoint_dir)


def read_tensorboard_dir(opt_ml: OptMl) -> Path | None:
    """Where TensorBoard scalars go: only when tensorboardoutputconfig.json asks for them."""
    path = opt_ml.tensorboardoutputconfig_file
    if not path.exists():
        return None
    return _local_path(opt_ml, path, opt_ml.default_tensorboard_dir)


# --- failure -----------------------------------------------------------------------------------


def write_failure(opt_ml: OptMl, message: str) -> None:
    """Write /opt/ml/output/failure: SageMaker shows its first 1024 characters as FailureReason."""
    text = (
        message if len(message) <= MAX_FAILURE_CHARS else message[: MAX_FAILURE_CHARS - 3] + "..."
    )
    write_text_atomically(opt_ml.failure_file, text)
