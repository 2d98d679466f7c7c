"""`launch` as a user runs it, a process of its own (`python -m launch`), beside the same command
run in this process as every other test here runs it (conftest.Launch): what only a fresh process
shows (the SDK's warnings at import, logging set up from nothing, the exit status) on one command
that fails and one that succeeds, and that the two ways print the same."""

from __future__ import annotations

import re

from tests.launch.conftest import Launch, one_line_error
from tests.launch.test_hosting import MODEL_DATA, artifact


def _unstamped(text: str) -> str:
    """Output with the stamps of generated names (yymmdd-HHMMSS-xxxx) made equal."""
    return re.sub(r"\d{6}-\d{6}-[0-9a-f]{4}", "YYMMDD-HHMMSS-XXXX", text)


def test_an_error_is_one_line_and_exit_status_1(launch: Launch) -> None:
    """No model artifact in S3: nothing on stdout, one line on stderr (no SDK v2 warning, no
    traceback), as in this process."""
    done = launch.process("deploy", "--model-data", MODEL_DATA)
    assert one_line_error(done).startswith(f"launch: no model artifact at {MODEL_DATA}: ")
    assert done.stdout == ""
    in_process = launch("deploy", "--model-data", MODEL_DATA)
    assert (in_process.returncode, in_process.stdout, in_process.stderr) == (
        done.returncode,
        done.stdout,
        done.stderr,
    )


def test_a_command_prints_its_result_and_logs_its_progress(launch: Launch) -> None:
    """A deploy: its lines on stdout; on stderr launch's warning and the SDK's progress lines,
    one message a line; the same in this process."""
    artifact(launch)
    flags = ("--model-data", MODEL_DATA, "--no-wait")
    done = launch.process("deploy", *flags, "--endpoint-name", "dogs")
    assert done.returncode == 0, done.stderr
    assert "endpoint: dogs " in done.stdout
    logged = done.stderr.splitlines()
    assert logged[0].startswith(
        "cannot read the image's sagemaker-dog-classifier.cuda label (not in the local docker "
    )
    assert "Creating endpoint with name dogs" in logged
    assert "Traceback" not in done.stderr
    assert "SDK v2" not in done.stderr

    in_process = launch("deploy", *flags, "--endpoint-name", "dogs-2")
    assert in_process.returncode == 0, in_process.stderr
    for stream in ("stdout", "stderr"):
        mine = getattr(in_process, stream).replace("dogs-2", "dogs")
        assert _unstamped(mine) == _unstamped(getattr(done, stream)), stream
