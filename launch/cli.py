"""The `launch` command line: one subcommand per SageMaker step, settings from flags or a file.

Each subcommand lives in its own module, which provides HELP (one line), add_arguments(parser)
and run(args, common) -> exit status. Common settings (region, role, image, bucket) are flags of
every subcommand and top-level keys of the config file; a subcommand's own settings are flags and
keys of the file's table named after it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import ValidationError

from launch.errors import LaunchError, SdkConfigError, explain
from launch.settings import DEFAULT_CONFIG, Common, load_config

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, str] = {
    # name: module
    "upload-data": "launch.data",
    "transform": "launch.transform",
    "invoke": "launch.invoke",
    "tune": "launch.tuning",
    "train": "launch.training",
    "report": "launch.report",
    "deploy": "launch.hosting",
    "add-model": "launch.add_model",
    "cleanup": "launch.cleanup",
    "explain": "launch.explain",
    "doctor": "launch.doctor",
}


def _common_flags() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common settings (also top-level keys of the config file)")
    for name, field in Common.model_fields.items():
        group.add_argument("--" + name.replace("_", "-"), dest=name, help=field.description)
    group.add_argument(
        "--config",
        type=Path,
        help=f"TOML settings file (default: ./{DEFAULT_CONFIG} when it exists)",
    )
    return parser


def _apply_config(parser: argparse.ArgumentParser, values: dict[str, Any], where: str) -> None:
    """The file's values become the parser's defaults, so flags still win."""
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LaunchError(f"unknown setting(s) {', '.join(unknown)} in {where} of the config file")
    parser.set_defaults(**values)


def _parser(config: dict[str, Any]) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="launch", description="Tune, train, deploy and use the image on SageMaker."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = _common_flags()
    modules = {name: importlib.import_module(module) for name, module in COMMANDS.items()}
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    unknown = sorted(set(tables) - set(modules))
    if unknown:
        raise LaunchError(f"unknown table(s) [{'], ['.join(unknown)}] in the config file")
    top = {k: v for k, v in config.items() if not isinstance(v, dict)}
    for name, module in modules.items():
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP, parents=[common])
        module.add_arguments(sub)
        _apply_config(sub, top, "the top level")
        _apply_config(sub, tables.get(name, {}), f"[{name}]")
    return parser, modules


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes each record to sys.stderr as it is at that moment, as logging's last-resort handler
    does: main() may run more than once in a process (the tests run it in theirs, with stderr
    captured anew each time), and a stream bound once would be the first run's."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _log_to_stderr() -> None:
    """Records of WARNING and up (INFO for the loggers main() lowers), one message a line;
    the handler is added once however often main() runs. Not logging.basicConfig: it does
    nothing where the root logger has a handler already (pytest's, in the tests)."""
    root = logging.getLogger()
    if not any(isinstance(handler, _StderrHandler) for handler in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)


# Filters are functions, not lambdas, so that adding one again (each main()) adds nothing.
def _no_troubleshooting_pointer(record: logging.LogRecord) -> bool:
    return "troubleshooting guide" not in str(record.msg)


def _no_traceback(record: logging.LogRecord) -> bool:
    return record.exc_info is None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("SAGEMAKER_SUPPRESS_V2_WARNING", "1")  # v2 is this tool's choice
    # This tool's and the SDK's progress lines; not botocore's or httpx's per-request chatter.
    _log_to_stderr()
    for name in ("launch", "sagemaker"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("sagemaker.config").setLevel(logging.WARNING)
    # Local mode logs a line per request and its compose file, and urllib3 each refused /ping
    # while the container starts; the container's own log, which local mode streams, says more.
    for name in ("sagemaker.local", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # The SDK logs a pointer to its troubleshooting guide before re-raising a refused Create*
    # call; launch's own one-line error says what to do (or, for --debugger auto, retries).
    for name in ("sagemaker", "sagemaker.estimator"):
        logging.getLogger(name).addFilter(_no_troubleshooting_pointer)
    # A telemetry ping that fails (offline, as local mode may be) is no traceback for the user.
    logging.getLogger("sagemaker.telemetry.telemetry_logging").addFilter(_no_traceback)
    config_flag = argparse.ArgumentParser(add_help=False)
    config_flag.add_argument("--config", type=Path)
    try:
        config = load_config(config_flag.parse_known_args(argv)[0].config)
        parser, modules = _parser(config)
        args = parser.parse_args(argv)
        given = {name: getattr(args, name) for name in Common.model_fields}
        common = Common(**{name: value for name, value in given.items() if value is not None})
        status: int = modules[args.command].run(args, common)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"launch: invalid settings: {problems}", file=sys.stderr)
        return 2
    except (LaunchError, BotoCoreError, ClientError, SdkConfigError) as exc:
        print(f"launch: {explain(exc)}", file=sys.stderr)
        return 1
    return status
