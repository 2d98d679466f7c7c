"""The real `train` process on a generated /opt/ml tree: it learns and writes what it should."""

from __future__ import annotations

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from container.model import build, load_artifact
from container.training.checkpoint import CHECKPOINT_FILE
from container.training.profiler import PHASES
from tests.conftest import FAST, Job

LEARN = {**FAST, "epochs": 5, "image_size": 64, "lr": 0.02, "warmup_epochs": 0.5, "workers": "auto"}


def test_learns_and_writes_model_reports_checkpoint_and_metrics(job: Job) -> None:
    job.set_hyperparameters(LEARN)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert job.failure() is None

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

    # The artifact loads and says what it is.
    artifact = load_artifact(job.opt_ml.model_dir)
    assert artifact.classes == ["Affenpinscher", "Afghan hound", "Airedale terrier", "Akita"]
    meta = artifact.meta
    assert meta["preprocessing"]["image_size"] == 64
    assert meta["preprocessing"]["resize_size"] == 73
    assert meta["best_epoch"] == run.metric("best_epoch")[0]
    assert meta["epochs_completed"] == 5
    assert meta["metrics"]["val_acc"] == pytest.approx(val_acc[-1], abs=1e-6)
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

    # Evaluation report: per split, per class, confusion matrix, history, skipped files.
    report = job.report("evaluation.json")
    assert report["model_version"] == artifact.model_version
    assert set(report["splits"]) == {"valid", "test"}
    valid = report["splits"]["valid"]
    assert valid["accuracy"] == pytest.approx(val_acc[-1], abs=1e-6)
    assert len(valid["per_class"]) == 4
    assert sum(map(sum, valid["confusion_matrix"])) == valid["images"] == 24
    assert sum(c["correct"] for c in valid["per_class"]) == round(valid["accuracy"] * 24)
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3, 4, 5]
    (skipped,) = report["data"]["train"]["skipped"]
    assert skipped["path"].endswith("broken_000.jpg")
    html = (job.opt_ml.output_data_dir / "evaluation.html").read_text()
    assert html.count("<img") >= 3  # curves, worst classes, confusion matrix
    assert "broken_000.jpg" in html

    # Profile: per-epoch time split and throughput, machine samples, one HTML page.
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

    # A checkpoint of the finished run.
    checkpoint = torch.load(job.base / "checkpoints" / CHECKPOINT_FILE, weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (5, 0)


def test_a_finished_job_restarted_with_its_checkpoint_only_reports_again(job: Job) -> None:
    first = job.run()
    assert first.returncode == 0, first.stderr
    model_version = job.meta()["model_version"]
    (job.opt_ml.model_dir / "model.pt").unlink()  # a new job: /opt/ml/model starts empty

    second = job.run()
    assert second.returncode == 0, second.stderr
    assert "Resuming from" in second.stderr
    assert second.metric("epoch") == []  # nothing left to train
    assert second.metric("val_acc") == first.metric("val_acc")[-1:]
    assert job.meta()["model_version"] == model_version


def test_bf16_and_fp32_both_train(job: Job) -> None:
    for precision in ("off", "bf16"):
        job.set_hyperparameters(FAST, mixed_precision=precision, epochs=1)
        run = job.run()
        assert run.returncode == 0, run.stderr
        expected = "fp32" if precision == "off" else "bfloat16"
        assert job.report("profile.json")["setup"]["precision"] == expected


def test_adamw_step_schedule_frozen_epochs_and_resnet34(job: Job) -> None:
    job.set_hyperparameters(
        FAST,
        arch="resnet34",
        optimizer="AdamW",
        lr=0.001,
        lr_schedule="step",
        lr_step_epochs=1,
        frozen_epochs=1,
        epochs=2,
    )
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "Epoch 1/2: 8 steps, backbone frozen" in run.stderr
    assert "Epoch 2/2: 8 steps\n" in run.stderr + "\n"
    assert job.meta()["arch"] == "resnet34"
    lrs = run.metric("lr")
    assert lrs[1] < lrs[0]


def test_frozen_backbone_with_fixed_inputs_trains_the_head_on_cached_features(job: Job) -> None:
    job.set_hyperparameters(FAST, frozen_epochs=2, augment=False)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "Cached backbone features for the frozen epochs" in run.stderr
    trained = load_artifact(job.opt_ml.model_dir).model.state_dict()
    torch.manual_seed(FAST.get("seed", 42))
    initial = build("resnet18", 4).state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    # Only the head learned; the backbone, BatchNorm statistics included, is as initialised.
    assert changed == {"fc.weight", "fc.bias"}


def test_tensorboard_scalars_when_configured(job: Job) -> None:
    board = job.opt_ml.output_dir / "tensorboard"
    job.write_config(
        "tensorboardoutputconfig.json",
        {"LocalPath": "/opt/ml/output/tensorboard", "S3OutputPath": "s3://bucket/tb"},
    )
    run = job.run()
    assert run.returncode == 0, run.stderr
    events = EventAccumulator(str(board))
    events.Reload()
    assert {"train_loss", "val_loss", "val_acc", "lr"} <= set(events.Tags()["scalars"])
    val_acc = [(e.step, round(e.value, 6)) for e in events.Scalars("val_acc")]
    assert val_acc == [(n, v) for n, v in zip((1, 2), run.metric("val_acc"), strict=False)]


def test_no_tensorboard_without_its_config(job: Job) -> None:
    assert job.run().returncode == 0
    assert not (job.opt_ml.output_dir / "tensorboard").exists()
