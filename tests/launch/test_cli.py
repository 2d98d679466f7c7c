"""The command line itself: every command's help, and settings from launch.toml under the flags."""

from __future__ import annotations

import re

import pytest

from launch.aws import job_name
from launch.cli import COMMANDS, main
from tests.conftest import ROOT
from tests.launch.conftest import IMAGE_URI, ROLE, Launch, one_line_error
from tests.launch.test_hosting import deploy


def _documented() -> list[str]:
    """The first column of docs/launch.md's table of commands."""
    text = (ROOT / "docs" / "launch.md").read_text()
    table = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z-]+)` \|", table, re.MULTILINE)


def test_every_command_is_documented_listed_and_has_help(
    capsys: pytest.CaptureFixture[str],
) -> None:
    documented = _documented()
    assert sorted(COMMANDS) == sorted(documented)  # none undocumented, none documented but gone
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    listing = capsys.readouterr().out
    # argparse's sub-command lines: a name indented 4 (its help's lines are indented further)
    assert sorted(re.findall(r"^    (\S+)", listing, re.MULTILINE)) == sorted(documented)
    for name in documented:
        with pytest.raises(SystemExit) as exited:
            main([name, "--help"])
        assert exited.value.code == 0
        assert "--role" in capsys.readouterr().out  # the common settings, on every command


def test_the_config_file_sets_defaults_and_flags_win(launch: Launch) -> None:
    (launch.cwd / "launch.toml").write_text(
        f'region = "us-east-1"\nrole = "{ROLE}"\nimage_uri = "{IMAGE_URI}"\n\n'
        '[deploy]\ninstance_type = "ml.c5.xlarge"\ninstance_count = 3\n'
    )
    launch.common = []  # role and image from the file alone
    deploy(launch, "--instance-count", "2", "--no-wait")
    sagemaker = launch.client("sagemaker")
    (config,) = sagemaker.list_endpoint_configs()["EndpointConfigs"]
    described = sagemaker.describe_endpoint_config(EndpointConfigName=config["EndpointConfigName"])
    (variant,) = described["ProductionVariants"]
    assert variant["InstanceType"] == "ml.c5.xlarge"  # from [deploy]
    assert variant["InitialInstanceCount"] == 2  # the flag over the file's 3
    (model,) = sagemaker.list_models()["Models"]
    described = sagemaker.describe_model(ModelName=model["ModelName"])
    assert described["PrimaryContainer"]["Image"] == IMAGE_URI
    assert described["ExecutionRoleArn"] == ROLE


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[deploy]\ninstance_typo = 1\n", "unknown setting(s) instance_typo in [deploy]"),
        ("[deplo]\nx = 1\n", "unknown table(s) [deplo]"),
        ("role = \n", "config file launch.toml is not valid TOML"),
        ("prefix = 3\n", "invalid settings: prefix"),
    ],
)
def test_a_bad_config_file_is_one_line(launch: Launch, content: str, message: str) -> None:
    (launch.cwd / "launch.toml").write_text(content)
    done = launch("cleanup", "--dry-run")
    assert message in done.stderr, done.stderr
    assert done.returncode != 0
    assert len(done.stderr.splitlines()) == 1, done.stderr


def test_a_missing_config_file_is_one_line(launch: Launch) -> None:
    assert "config file nowhere.toml does not exist" in one_line_error(
        launch("cleanup", "--config", "nowhere.toml")
    )


def test_generated_names_differ_within_a_second_and_keep_their_kind() -> None:
    """A script's deploys can start within one second: each names its own model (a name met
    again makes the SDK reuse that model, with the other artifact)."""
    first, second = (job_name("dog-classifier", "model") for _ in range(2))
    assert first != second
    assert first.startswith("dog-classifier-model-")
