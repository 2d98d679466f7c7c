"""The /opt/ml contract: hyperparameter decoding, row by row, and config files
(docs/sagemaker-contract.md §2.3)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from container.sagemaker_env import (
    MAX_FAILURE_CHARS,
    ConfigFileError,
    HyperparameterSchema,
    OptMl,
    decode_hyperparameter,
    decode_hyperparameters,
    encode_hyperparameters,
    read_channels,
    read_checkpoint_dir,
    read_hyperparameters,
    read_resource_config,
    read_tensorboard_dir,
    write_failure,
)
from container.training.hyperparameters import Hyperparameters

# How each producer encodes lr=0.001, optimizer="adam", freeze=True, [1, 2]
# (docs/sagemaker-contract.md §2.3).
ENCODINGS = {
    "v2 Estimator(image_uri), no source_dir": ("0.001", "adam", "True", "[1, 2]"),
    "v2 with source_dir / framework estimator": ("0.001", '"adam"', "true", "[1, 2]"),
    "v3 ModelTrainer": ("0.001", "adam", "true", "[1, 2]"),
}


class Schema(HyperparameterSchema):
    lr: float = 0.1
    optimizer: str = "sgd"
    freeze: bool = False
    milestones: tuple[int, ...] = ()
    epochs: int = 1


@pytest.mark.parametrize("producer", list(ENCODINGS))
def test_every_sdk_encoding_decodes_to_the_same_values(producer: str) -> None:
    lr, optimizer, freeze, milestones = ENCODINGS[producer]
    raw = {"lr": lr, "optimizer": optimizer, "freeze": freeze, "milestones": milestones}
    decoded = decode_hyperparameters(raw, Schema)
    assert decoded == Schema(lr=0.001, optimizer="adam", freeze=True, milestones=(1, 2))


def test_what_we_encode_decodes_to_what_was_meant() -> None:
    """quickstart, compose, launch, bench and the tests all write hyperparameters through here."""
    meant = {
        "arch": "resnet34",
        "pretrained_weights": None,  # str(None) would come back as a file named "None"
        "pretrained": False,
        "lr": 0.0139003,
        "epochs": 3,
    }
    encoded = encode_hyperparameters(meant)
    assert all(isinstance(value, str) for value in encoded.values())
    assert encoded["pretrained_weights"] == "null"
    decoded = decode_hyperparameters(encoded, Hyperparameters)
    assert decoded.model_dump(include=set(meant)) == meant


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("0.0139003", 0.0139003),  # a tuned continuous value
        ("1e-3", 0.001),  # exponent
        ('"adam"', "adam"),  # JSON-quoted string
        ("adam", "adam"),  # raw string (not JSON)
        ("True", "True"),  # Python repr is not JSON: kept raw, the schema coerces it
        ("[1, 2]", [1, 2]),
        ("null", None),
        ("", ""),
    ],
)
def test_json_if_it_parses_else_raw(raw: str, expected: Any) -> None:
    assert decode_hyperparameter(raw) == expected


@pytest.mark.parametrize(
    ("field", "raw", "expected"),
    [
        ("freeze", "True", True),
        ("freeze", "False", False),
        ("freeze", "true", True),
        ("freeze", "false", False),
        ("freeze", "1", True),
        ("freeze", "0", False),
        ("freeze", "yes", True),
        ("freeze", "no", False),
        ("epochs", "12", 12),
        ("epochs", "12.0", 12),
        ("lr", "1E-4", 1e-4),
        ("optimizer", "123", "123"),  # a number where a string is expected stays usable
    ],
)
def test_lenient_coercion(field: str, raw: str, expected: Any) -> None:
    assert getattr(decode_hyperparameters({field: raw}, Schema), field) == expected


def test_injected_keys_are_ignored_and_unknown_keys_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    raw = {
        "lr": "0.5",
        "_tuning_objective_metric": "val_acc",  # the tuner's, not JSON
        "sagemaker_program": '"train.py"',
        "sagemaker_submit_directory": '"s3://bucket/code"',
        "not_a_knob": "3",
    }
    with caplog.at_level(logging.INFO):
        decoded = decode_hyperparameters(raw, Schema)
    assert decoded.lr == 0.5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["Ignoring unknown hyperparameter not_a_knob='3'"]
    infos = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "_tuning_objective_metric" in infos
    assert "sagemaker_program" in infos


def test_hyphens_and_underscores_name_the_same_knob() -> None:
    hp = decode_hyperparameters({"batch-size": "64", "weight_decay": "0.01"}, Hyperparameters)
    assert (hp.batch_size, hp.weight_decay) == (64, 0.01)


def test_choices_are_case_insensitive() -> None:
    hp = decode_hyperparameters({"optimizer": "AdamW", "lr_schedule": '"Cosine"'}, Hyperparameters)
    assert (hp.optimizer, hp.lr_schedule) == ("adamw", "cosine")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"lr": "fast"}, ["lr='fast'", "valid number"]),
        ({"epochs": "2.5"}, ["epochs=2.5", "integer"]),
        ({"optimizer": "adam"}, ["optimizer='adam'", "'sgd' or 'adamw'"]),
        ({"epochs": "0"}, ["epochs=0", "greater than or equal to 1"]),
        ({"epochs": "2", "frozen_epochs": "3"}, ["frozen_epochs=3 exceeds epochs=2"]),
    ],
)
def test_bad_values_name_the_key_and_the_problem(raw: dict[str, str], words: list[str]) -> None:
    with pytest.raises(ConfigFileError) as info:
        decode_hyperparameters(raw, Hyperparameters)
    for word in words:
        assert word in str(info.value)
    assert "Fix it in the job's hyperparameters" in str(info.value)


def test_paths_follow_the_base_dir() -> None:
    opt_ml = OptMl.from_environ({"SAGEMAKER_BASE_DIR": "/tmp/x"})
    assert opt_ml.hyperparameters_file == Path("/tmp/x/input/config/hyperparameters.json")
    assert opt_ml.channel_dir("train") == Path("/tmp/x/input/data/train")
    assert opt_ml.model_dir == Path("/tmp/x/model")
    assert opt_ml.failure_file == Path("/tmp/x/output/failure")
    assert opt_ml.output_data_dir == Path("/tmp/x/output/data")
    assert OptMl.from_environ({}).base == Path("/opt/ml")


def _opt_ml(tmp_path: Path, **configs: Any) -> OptMl:
    opt_ml = OptMl(tmp_path)
    opt_ml.config_dir.mkdir(parents=True)
    for name, content in configs.items():
        text = content if isinstance(content, str) else json.dumps(content)
        (opt_ml.config_dir / f"{name}.json").write_text(text)
    return opt_ml


def test_channels_come_from_inputdataconfig_not_the_folder(tmp_path: Path) -> None:
    opt_ml = _opt_ml(
        tmp_path,
        inputdataconfig={
            "train": {"TrainingInputMode": "FastFile", "S3DistributionType": "FullyReplicated"},
            "valid": {"ContentType": "application/x-image"},
        },
    )
    (opt_ml.data_dir / "train").mkdir(parents=True)
    (opt_ml.data_dir / "train-manifest").write_text("s3://bucket/x.jpg")  # SageMaker leaves these
    (opt_ml.data_dir / "stray").mkdir()
    channels = read_channels(opt_ml)
    assert sorted(channels) == ["train", "valid"]
    assert channels["train"].input_mode == "FastFile"
    assert channels["train"].path == opt_ml.data_dir / "train"
    assert (
        channels["valid"].path == opt_ml.data_dir / "valid"
    )  # its ContentType is not ours to read


def test_missing_inputdataconfig_says_what_to_write(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r'inputdataconfig.json is missing.*"train": \{\}'):
        read_channels(_opt_ml(tmp_path))


def test_malformed_json_names_file_and_position(tmp_path: Path) -> None:
    opt_ml = _opt_ml(tmp_path, hyperparameters='{"lr": 0.1,}')
    with pytest.raises(ConfigFileError, match=r"hyperparameters.json is not valid JSON .*line 1"):
        read_hyperparameters(opt_ml, Schema)


def test_empty_hyperparameters_mean_defaults(tmp_path: Path) -> None:
    assert read_hyperparameters(_opt_ml(tmp_path, hyperparameters={}), Schema) == Schema()
    assert read_hyperparameters(_opt_ml(tmp_path / "none"), Schema) == Schema()


def test_resource_config(tmp_path: Path) -> None:
    opt_ml = _opt_ml(
        tmp_path,
        resourceconfig={
            "current_host": "algo-2",
            "current_instance_type": "ml.g5.xlarge",
            "hosts": ["algo-1", "algo-2"],
            "network_interface_name": "eth0",
            "instance_groups": [{"instance_group_name": "homogeneousCluster"}],
        },
    )
    resources = read_resource_config(opt_ml)
    assert (resources.host_rank, resources.master_host) == (1, "algo-1")
    assert resources.network_interface_name == "eth0"
    assert resources.current_instance_type == "ml.g5.xlarge"
    local = read_resource_config(_opt_ml(tmp_path / "local"))
    assert (local.hosts, local.current_instance_type) == (("algo-1",), None)


def test_resource_config_current_host_must_be_listed(tmp_path: Path) -> None:
    opt_ml = _opt_ml(tmp_path, resourceconfig={"current_host": "algo-3", "hosts": ["algo-1"]})
    with pytest.raises(ConfigFileError, match="current_host 'algo-3' is not one of hosts"):
        read_resource_config(opt_ml)


def test_checkpoint_and_tensorboard_dirs_are_rebased_into_the_tree(tmp_path: Path) -> None:
    opt_ml = _opt_ml(
        tmp_path,
        checkpointconfig={"LocalPath": "/opt/ml/checkpoints", "S3Uri": "s3://b/ckpt"},
        tensorboardoutputconfig={
            "LocalPath": "/opt/ml/output/tensorboard",
            "S3OutputPath": "s3://b",
        },
    )
    assert read_checkpoint_dir(opt_ml) == tmp_path / "checkpoints"
    assert read_tensorboard_dir(opt_ml) == tmp_path / "output" / "tensorboard"
    elsewhere = _opt_ml(tmp_path / "b", checkpointconfig={"LocalPath": "/scratch/ckpt"})
    assert read_checkpoint_dir(elsewhere) == Path("/scratch/ckpt")


def test_without_config_files_checkpoints_go_to_the_default_and_tensorboard_is_off(
    tmp_path: Path,
) -> None:
    opt_ml = _opt_ml(tmp_path)
    assert read_checkpoint_dir(opt_ml) == tmp_path / "checkpoints"
    assert read_tensorboard_dir(opt_ml) is None


def test_failure_file_is_capped_at_what_sagemaker_shows(tmp_path: Path) -> None:
    opt_ml = OptMl(tmp_path)
    write_failure(opt_ml, "short reason")
    assert opt_ml.failure_file.read_text() == "short reason"
    write_failure(opt_ml, "x" * 5000)
    text = opt_ml.failure_file.read_text()
    assert len(text) == MAX_FAILURE_CHARS
    assert text.endswith("...")
