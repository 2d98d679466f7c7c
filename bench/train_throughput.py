"""Training throughput: our job against a torchvision-reference loop, same data, same run.

One synthetic dataset of photo-sized JPEGs is generated; then each configuration runs both loops,
each time in a fresh process: the real `train` entry point on an /opt/ml tree, and
`bench.reference_train`, a plain loop written the way torchvision's classification reference is
(ImageFolder + PIL transforms + fp32 eager). Both get the same hyperparameters, so the same
initial weights, optimiser and learning-rate curve. The loops alternate for a few rounds and each
is represented by its fastest round, since a shared VM's cores come and go. The result replaces
the "Training throughput" section of docs/benchmarks.md; progress goes to stderr and the section
to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from bench._cli import add_output_argument, add_workdir_argument, command, log_to_stderr, work_in
from bench._markdown import replace_section
from bench._report import ConfigResults, render
from bench._runs import Configuration, LoopResult, run_ours, run_reference
from container.sample_data import SampleSpec, make_dataset

__all__ = ["SECTION", "BenchSettings", "main"]

logger = logging.getLogger(__name__)

SECTION = "train-throughput"
"""The marker name of this benchmark's section in the output document."""
_MIN_SIDE, _MAX_SIDE = 375, 500  # photo-sized: the short side of a typical 500x375 photo
FIRST_SEED = 42
"""Round r runs both loops with seed FIRST_SEED + r - 1: repeats that also sample accuracy."""


@dataclass(frozen=True)
class BenchSettings:
    """What to run: dataset size, epochs, rounds, the shared learning rate, where results go."""

    epochs: int
    classes: int
    per_class: int
    valid_per_class: int
    rounds: int
    lr: float
    reference_workers: int
    output: Path
    workdir: Path | None  # keep every run's files here; None = a temporary folder
    command: str  # how this run was started, for the document


def _configurations(settings: BenchSettings) -> list[Configuration]:
    shared: dict[str, object] = {
        "arch": "resnet18",
        "pretrained": False,
        "image_size": 224,
        "batch_size": 32,
        "epochs": settings.epochs,
        "optimizer": "sgd",
        "momentum": 0.9,
        "lr": settings.lr,
        "lr_schedule": "cosine",
        "warmup_epochs": 0,
        "label_smoothing": 0.1,
    }
    probe = {**shared, "frozen_epochs": settings.epochs, "augment": False}
    return [
        Configuration("fine-tune", shared, False, "median", FIRST_SEED),
        Configuration("linear probe", probe, True, "overall", FIRST_SEED),
    ]


def _spec(settings: BenchSettings) -> SampleSpec:
    return SampleSpec(
        classes=settings.classes,
        per_class={"train": settings.per_class, "valid": settings.valid_per_class},
        min_side=_MIN_SIDE,
        max_side=_MAX_SIDE,
        png_every=0,  # photos: all JPEG, like the dog dataset
        corrupt={},  # both loops must see the same images; ImageFolder cannot skip bad ones
        seed=0,
    )


def _spec_line(settings: BenchSettings) -> str:
    train = settings.classes * settings.per_class
    valid = settings.classes * settings.valid_per_class
    return (
        f"`container.sample_data`, {settings.classes} classes, {settings.per_class} training and "
        f"{settings.valid_per_class} validation JPEGs per class ({train} / {valid} images), "
        f"short side {_MIN_SIDE}-{_MAX_SIDE} px"
    )


def _log_run(config: Configuration, run: LoopResult) -> None:
    logger.info(
        "%s, %s, round %d (seed %d): %s images/s per epoch, best val acc %.3f, %.0f s "
        "(host cores %.2f)",
        config.name,
        run.loop,
        run.round,
        run.seed,
        " / ".join(f"{v:.1f}" for v in run.images_per_sec),
        run.final_val_acc,
        run.process_s,
        run.host_cores,
    )


def _benchmark(settings: BenchSettings, work: Path) -> list[ConfigResults]:
    data = work / "dataset"
    logger.info("Generating the dataset in %s: %s", data, _spec_line(settings))
    make_dataset(data, _spec(settings))
    results = []
    for index, config in enumerate(_configurations(settings)):
        ours: list[LoopResult] = []
        reference: list[LoopResult] = []
        for round_ in range(1, settings.rounds + 1):
            seeded = dataclasses.replace(config, seed=FIRST_SEED + round_ - 1)
            run_dir = work / f"config{index}" / f"round{round_}"
            logger.info("%s, round %d/%d: our job ...", config.name, round_, settings.rounds)
            ours.append(run_ours(data, run_dir / "ours", seeded, round_))
            _log_run(config, ours[-1])
            logger.info("%s, round %d/%d: reference ...", config.name, round_, settings.rounds)
            reference.append(
                run_reference(
                    data, run_dir / "reference", seeded, round_, settings.reference_workers
                )
            )
            _log_run(config, reference[-1])
        results.append(ConfigResults(config, ours, reference))
    return results


def main(settings: BenchSettings) -> str:
    """Run the benchmark, write its section into `settings.output` and return that section."""
    with work_in(settings.workdir, "bench-train-") as work:
        results = _benchmark(settings, work)
    section = render(results, spec_line=_spec_line(settings), command=settings.command)
    replace_section(settings.output, SECTION, section)
    logger.info("Wrote the %s section of %s", SECTION, settings.output)
    return section


def _parse(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--epochs",
        type=int,
        default=8,
        help="epochs per run (default: 8; both loops have converged by then, so their final "
        "accuracies compare; after 3 epochs seed noise of +-10 points dominates)",
    )
    parser.add_argument(
        "--classes", type=int, default=8, help="classes in the generated dataset, 2-16 (default: 8)"
    )
    parser.add_argument(
        "--per-class", type=int, default=40, help="training images per class (default: 40)"
    )
    parser.add_argument(
        "--valid-per-class", type=int, default=10, help="validation images per class (default: 10)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating runs of each loop per configuration, each with its own seed; the "
        "fastest counts for images/s, the mean for accuracy (default: 3)",
    )
    parser.add_argument(
        "--lr", type=float, default=0.05, help="peak learning rate of both loops (default: 0.05)"
    )
    parser.add_argument(
        "--reference-workers",
        type=int,
        default=2,
        help="DataLoader workers of the reference loop (default: 2, one per core here)",
    )
    add_output_argument(parser, "benchmarks.md", "whose training-throughput section is replaced")
    add_workdir_argument(parser, "the dataset, /opt/ml trees, logs and reports")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.epochs < 1:
        parser.error("--rounds and --epochs must be at least 1")
    return BenchSettings(
        epochs=args.epochs,
        classes=args.classes,
        per_class=args.per_class,
        valid_per_class=args.valid_per_class,
        rounds=args.rounds,
        lr=args.lr,
        reference_workers=args.reference_workers,
        output=args.output,
        workdir=args.workdir,
        command=command("bench.train_throughput", argv),
    )


if __name__ == "__main__":
    log_to_stderr()
    print(main(_parse()))
