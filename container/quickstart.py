"""`make run`: from nothing (or your dataset, or your model) to a server answering on :8080.

    python -m container.quickstart                  # sample data -> demo model -> server
    python -m container.quickstart ~/dogImages.zip  # the dog dataset (zip or folder) -> server
    python -m container.quickstart model.tar.gz     # an existing model -> server
    python -m container.quickstart --prepare        # lay out the tree only (docker-compose.yml)

It lays out an /opt/ml tree the way SageMaker would (default ./opt_ml): the dataset's channels, or
the data already in the tree, or a generated sample when there is none, and the config files for
them. Then it runs the real `train` when there is no model yet and replaces itself with the real
`serve`. A model already in the tree is served as it is; delete opt_ml/model to train again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from container.archives import is_archive
from container.model import META_FILE
from container.sagemaker_env import (
    BASE_DIR_ENV,
    DATA_CHANNELS,
    OPTIONAL_CHANNELS,
    REQUIRED_CHANNELS,
    OptMl,
    write_training_config,
)
from container.sample_data import SampleSpec, make_dataset

__all__ = ["DEMO_HYPERPARAMETERS", "DOG_HYPERPARAMETERS", "main", "prepare"]

DEMO_HYPERPARAMETERS = {
    "epochs": 5,
    "batch_size": 8,
    "lr": 0.02,
    "warmup_epochs": 0.5,
    "image_size": 64,
    "pretrained": False,  # no download needed: the demo runs offline
}
"""A minute on a laptop CPU: a model of the generated shapes, not of dogs."""

DOG_HYPERPARAMETERS = {"epochs": 6, "frozen_epochs": 1, "lr": 0.01}
"""Fine-tuning ImageNet ResNet18 on the dog dataset: head first, then everything."""


_SAMPLE_MARK = ".generated-sample"
"""Left in input/data beside a generated sample, so a later run keeps the demo's settings."""


def _link_dataset(data: Path, source: Path) -> None:
    """Each channel gets the dataset (folder: its split; archive: the whole archive)."""
    for split in DATA_CHANNELS:
        target = data / split
        if is_archive(source):
            target.mkdir(parents=True, exist_ok=True)
            link = target / source.name
            if not link.exists():
                link.symlink_to(source.resolve())
        elif (source / split).is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
            if not target.exists():
                target.symlink_to((source / split).resolve())


def prepare(opt_ml: Path, source: Path | None, overrides: Mapping[str, object]) -> None:
    """Lay out `opt_ml` for `train` and write its config files.

    The data: `source` linked in, else what the tree already holds, else a generated sample. The
    hyperparameters: the defaults for that data (the demo's for the sample, fine-tuning for real
    data), with `overrides` on top, written as strings the way SageMaker writes them.
    """
    tree = OptMl(opt_ml)
    data = tree.data_dir
    if source is not None:
        _link_dataset(data, source)
        (data / _SAMPLE_MARK).unlink(missing_ok=True)
    elif not data.is_dir() or not any(p.is_dir() for p in data.iterdir()):
        make_dataset(data, SampleSpec())
        (data / _SAMPLE_MARK).touch()
    channels = sorted(p.name for p in data.iterdir() if p.is_dir())
    train = REQUIRED_CHANNELS[0]
    if train not in channels:
        raise SystemExit(f"{data} has no {train}/ folder: put the dataset's train/ valid/ there")
    defaults = DEMO_HYPERPARAMETERS if (data / _SAMPLE_MARK).exists() else DOG_HYPERPARAMETERS
    write_training_config(tree, channels, {**defaults, **overrides})


def _hyperparameters(text: str) -> dict[str, object]:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}): {text!r}") from exc
    if not isinstance(values, dict):
        raise argparse.ArgumentTypeError(f'not a JSON object like {{"epochs": 3}}: {text!r}')
    return values


def _train(opt_ml: OptMl) -> None:
    env = {**os.environ, BASE_DIR_ENV: str(opt_ml.base)}
    print(f"Training a model in {opt_ml.base} ...", file=sys.stderr, flush=True)
    done = subprocess.run([sys.executable, "-m", "container.training"], env=env, check=False)
    if done.returncode != 0:
        failure = opt_ml.failure_file
        reason = failure.read_text() if failure.exists() else f"exit code {done.returncode}"
        raise SystemExit(f"Training failed: {reason}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        help="the dog dataset (a folder with train/ valid/ [test/], or its .zip), or a "
        "model.tar.gz; default: a generated sample dataset",
    )
    parser.add_argument("--opt-ml", type=Path, default=Path("opt_ml"), help="the /opt/ml tree")
    parser.add_argument("--port", type=int, default=8080, help="port to serve on")
    parser.add_argument(
        "--hyperparameters",
        type=_hyperparameters,
        default=os.environ.get("HYPERPARAMETERS") or "{}",
        help="JSON object over the defaults, e.g. '{\"epochs\": 3}' (default: $HYPERPARAMETERS)",
    )
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="only lay out the tree and write its config files (what docker-compose.yml runs)",
    )
    args = parser.parse_args(argv)
    opt_ml = OptMl(args.opt_ml.resolve())
    model = opt_ml.model_dir
    source: Path | None = args.source
    if source is not None and not source.exists():
        raise SystemExit(f"{source} does not exist")
    model_archive = source is not None and source.name.endswith((".tar.gz", ".tgz"))
    if args.prepare:
        if model_archive:
            raise SystemExit("--prepare lays out training data; a model.tar.gz needs no training")
        prepare(opt_ml.base, source, args.hyperparameters)
        return
    if source is not None and model_archive:
        shutil.rmtree(model, ignore_errors=True)
        model.mkdir(parents=True)
        shutil.copy(source, model / source.name)  # the server unpacks it
    elif not (model / META_FILE).exists():
        prepare(opt_ml.base, source, args.hyperparameters)
        _train(opt_ml)
    sample = next(opt_ml.channel_dir(OPTIONAL_CHANNELS[0]).rglob("*.jpg"), None)
    if sample is not None:
        print(
            f"Try: curl --data-binary @{sample} -H 'Content-Type: image/jpeg' "
            f"localhost:{args.port}/invocations",
            file=sys.stderr,
            flush=True,
        )
    env = {
        **os.environ,
        BASE_DIR_ENV: str(opt_ml.base),
        "SAGEMAKER_BIND_TO_PORT": str(args.port),
    }
    os.execve(sys.executable, [sys.executable, "-m", "container.serving"], env)


if __name__ == "__main__":
    main()
