"""The real `train` process on a generated /opt/ml tree: it learns and writes what it should.

Two runs, each read by several tests: `learned`, a default job that learns the sample classes,
and `variant`, the other choices (ResNet34, AdamW, a step schedule, a frozen first epoch, fp32,
TensorBoard, a hook config with the Debugger turned off).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from container.model import load_artifact
from container.training.checkpoint import CHECKPOINT_FILE
from container.training.metrics import METRIC_DEFINITIONS
from container.training.profiler import PHASES
from tests.conftest import FAST, Job, NewJob, TrainRun
from tests.training.test_debugger import HOOK_CONFIG

LEARN = {**FAST, "epochs": 5, "image_size": 64, "lr": 0.02, "warmup_epochs": 0.5, "workers": "auto"}

Ran = tuple[Job, TrainRun]


def _run(job: Job) -> Ran:
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert job.failure() is None
    return job, run


@pytest.fixture(scope="module")
def learned(jobs: NewJob) -> Ran:
    return _run(jobs("learned", LEARN))


@pytest.fixture(scope="module")
def variant(jobs: NewJob) -> Ran:
    job = jobs(
        "variant",
        {
            **FAST,
            "arch": "resnet34",
            "optimizer": "AdamW",
            "lr": 0.001,
            "lr_schedule": "step",
            "lr_step_epochs": 1,
            "frozen_epochs": 1,
            "mixed_precision": "off",
            "debugger": "off",
        },
    )
    job.write_config(
        "tensorboardoutputconfig.json",
        {"LocalPath": "/opt/ml/output/tensorboard", "S3OutputPath": "s3://bucket/tb"},
    )
    job.write_config("debughookconfig.json", {**HOOK_CONFIG, "LocalPath": str(_tensors(job))})
    return _run(job)


def _tensors(job: Job) -> Path:
    return job.opt_ml.output_dir / "tensors"


def test_it_learns_and_prints_one_metric_line_per_epoch(learned: Ran) -> None:
    _, run = learned
    # It learns: 4 classes, chance is 0.25.
    val_acc = run.metric("val_acc")
    assert len(val_acc) == 5 + 1  # one per epoch, then the final line
    assert max(val_acc[:-1]) >= 0.75, run.stdout

    # Metric lines: one per epoch, the test line, the final line; the objective comes last.
    lines = run.metric_lines()
    assert [line.split()[0] for line in lines] == [f"epoch={n}" for n in range(1, 6)] + [
        "test",
        "final",
    ]
    assert all(line.split()[-1].startswith("val_acc=") for line in lines if line[0] != "t")
    assert run.metric("epoch") == [1, 2, 3, 4, 5]
    assert val_acc[-1] == max(val_acc[:-1])  # the shipped (best) model's accuracy is last
    assert run.metric("best_epoch") == [float(val_acc.index(val_acc[-1]) + 1)]
    assert len(run.metric("test_acc")) == 1


def test_the_metric_regexes_scrape_the_metric_lines_and_nothing_else(learned: Ran) -> None:
    """SageMaker applies every regex to every line of the log, stdout and stderr alike."""
    _, run = learned
    for line in (run.stdout + run.stderr).splitlines():
        scraped = {
            d["Name"]: float(found[0])
            for d in METRIC_DEFINITIONS
            if (found := re.findall(d["Regex"], line))
        }
        if not line.endswith(";"):
            assert scraped == {}, line
            continue
        # What the line says, read without the regexes: `[prefix] key=value ... key=value;`.
        pairs = [word.split("=") for word in line.removesuffix(";").split() if "=" in word]
        assert scraped == {key: float(value) for key, value in pairs}, line


def test_the_artifact_loads_and_says_what_it_is(learned: Ran) -> None:
    job, run = learned
    artifact = load_artifact(job.opt_ml.model_dir)
    assert artifact.classes == ["Affenpinscher", "Afghan hound", "Airedale terrier", "Akita"]
    meta = artifact.meta
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["preprocessing"]["resize_size"] == 73
    assert meta["best_epoch"] == run.metric("best_epoch")[0]
    assert meta["epochs_completed"] == 5
    assert meta["metrics"]["val_acc"] == pytest.approx(run.metric("val_acc")[-1], abs=1e-6)
    assert set(meta["metrics"]) == {
        "val_acc",
        "val_loss",
        "val_top5",
        "test_acc",
        "test_loss",
        "test_top5",
    }
    assert meta["hyperparameters"]["image_size"] == 64
    assert meta["pretrained_from"] == "random initialisation (pretrained=false)"
    assert meta["versions"]["torch"] == torch.__version__
    # int8=false (FAST): no int8 network, and nothing that says there is one.
    assert "int8" not in meta
    assert sorted(p.name for p in job.opt_ml.model_dir.iterdir()) == [
        "classes.json",
        "feature_stats.pt",
        "model.pt",
        "model_meta.json",
    ]


def test_evaluation_report(learned: Ran) -> None:
    """Per split, per class, confusion matrix, history, skipped files; and its HTML page."""
    job, run = learned
    report = job.report("evaluation.json")
    assert report["model_version"] == job.meta()["model_version"]
    assert set(report["splits"]) == {"valid", "test"}
    valid = report["splits"]["valid"]
    assert valid["accuracy"] == pytest.approx(run.metric("val_acc")[-1], abs=1e-6)
    assert len(valid["per_class"]) == 4
    assert sum(map(sum, valid["confusion_matrix"])) == valid["images"] == 24
    assert sum(c["correct"] for c in valid["per_class"]) == round(valid["accuracy"] * 24)
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4, 5]
    (skipped,) = report["data"]["train"]["skipped"]
    assert skipped["path"].endswith("broken_000.jpg")
    html = (job.opt_ml.output_data_dir / "evaluation.html").read_text()
    assert html.count("<img") >= 3  # curves, worst classes, confusion matrix
    assert "broken_000.jpg" in html
    assert '<table class="sortable">' in html
    assert report["findings"]
    assert report["findings"][0]["text"].startswith("Accuracy on test:")


def test_precision_recall_and_f1_are_those_of_the_confusion_matrix(learned: Ran) -> None:
    job, _ = learned
    for split in job.report("evaluation.json")["splits"].values():
        matrix = split["confusion_matrix"]
        rows = split["per_class"]
        for c, row in enumerate(rows):
            support = sum(matrix[c])
            predicted = sum(line[c] for line in matrix)
            correct = matrix[c][c]
            precision = correct / predicted if predicted else None
            recall = correct / support if support else None
            assert (row["support"], row["correct"]) == (support, correct)
            assert row["precision"] == pytest.approx(precision)
            assert row["recall"] == pytest.approx(recall)
            if precision is None or recall is None:
                assert row["f1"] is None
            else:
                f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0
                assert row["f1"] == pytest.approx(f1)
        total = sum(r["support"] for r in rows)
        for metric in ("precision", "recall", "f1"):
            values = [r[metric] or 0.0 for r in rows]
            averages = split["averages"][metric]
            assert averages["macro"] == pytest.approx(sum(values) / len(rows))
            weighted = sum(v * r["support"] for v, r in zip(values, rows, strict=True)) / total
            assert averages["weighted"] == pytest.approx(weighted)
        assert split["averages"]["recall"]["weighted"] == pytest.approx(split["accuracy"])


def test_profile(learned: Ran) -> None:
    """Per-epoch time split and throughput, machine samples, one HTML page."""
    job, _ = learned
    profile = job.report("profile.json")
    assert [e["epoch"] for e in profile["epochs"]] == [1, 2, 3, 4, 5]
    for epoch in profile["epochs"]:
        assert set(epoch["seconds"]) == set(PHASES)
        assert epoch["seconds"]["forward_backward"] > 0
        assert epoch["seconds"]["evaluation"] > 0
        assert epoch["images_per_sec"] > 0
        assert epoch["train_images"] == 64
    assert profile["setup"]["device"] == "cpu"
    assert profile["samples"], "the sampler thread recorded nothing"
    assert {"cpu_percent", "rss_mb", "gpu_percent"} <= set(profile["samples"][0])
    assert (job.opt_ml.output_data_dir / "profile.html").read_text().count("<img") >= 2


def test_a_checkpoint_after_every_epoch_by_default(learned: Ran) -> None:
    job, run = learned
    saved = re.findall(r"Checkpoint saved after epoch (\d+)", run.stderr)
    assert saved == ["1", "2", "3", "4", "5"]
    checkpoint = torch.load(job.base / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (5, 0)


def test_no_tensorboard_without_its_config(learned: Ran) -> None:
    job, _ = learned
    assert not (job.opt_ml.output_dir / "tensorboard").exists()


def test_adamw_step_schedule_frozen_first_epoch_resnet34_in_fp32(variant: Ran) -> None:
    job, run = variant
    assert "Epoch 1/2: 8 steps, backbone frozen\n" in run.stderr
    assert "Epoch 2/2: 8 steps\n" in run.stderr
    assert job.meta()["arch"] == "resnet34"
    lrs = run.metric("lr")
    assert lrs[1] == pytest.approx(lrs[0] * 0.1)  # lr_gamma after lr_step_epochs=1
    assert job.report("profile.json")["setup"]["precision"] == "fp32"


def test_tensorboard_scalars_when_configured(variant: Ran) -> None:
    job, run = variant
    events = EventAccumulator(str(job.opt_ml.output_dir / "tensorboard"))
    events.Reload()
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(events.Tags()["scalars"])
    val_acc = [(e.step, round(e.value, 6)) for e in events.Scalars("val_acc")]
    assert val_acc == list(zip((1, 2), run.metric("val_acc"), strict=False))


def test_debugger_off_writes_no_tensors_despite_a_hook_config(variant: Ran) -> None:
    """The same hook config with debugger=auto writes tensors (test_debugger.py)."""
    job, run = variant
    assert not _tensors(job).exists()
    assert "SageMaker Debugger" not in run.stderr
