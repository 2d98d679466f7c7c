"""`launch report` on a job in moto, with the tensors of a real `train` run read by smdebug."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile

from launch.report import DebugAnalysis, findings
from tests.conftest import Job
from tests.launch.conftest import Launch, one_line_error

BUCKET = "report-bucket"

HOOK_CONFIG = {
    "S3OutputPath": "s3://bucket/job/debug-output",
    "HookParameters": {"save_interval": "2"},
    "CollectionConfigurations": [
        {"CollectionName": "losses", "CollectionParameters": {"save_interval": "1"}},
        {"CollectionName": "gradients"},
        {"CollectionName": "weights"},
        {"CollectionName": "biases"},
    ],
    "DebugHookSpecification": None,
}


def _train_job(launch: Launch, *flags: str) -> str:
    launch.client("s3").create_bucket(Bucket=BUCKET)
    done = launch.ok("train", "--bucket", BUCKET, "--no-wait", *flags)
    return done.stdout.splitlines()[0].removeprefix("training job ")


def test_report_reads_real_tensors_into_one_html_page(launch: Launch, job: Job) -> None:
    tensors = job.opt_ml.output_dir / "tensors"
    job.write_config("debughookconfig.json", {**HOOK_CONFIG, "LocalPath": str(tensors)})
    run = job.run()
    assert run.returncode == 0, run.stderr
    name = _train_job(launch)
    # What SageMaker would upload at the job's end: /opt/ml/output/data as output.tar.gz.
    with tarfile.open(job.base / "output.tar.gz", "w:gz") as tar:
        tar.add(job.opt_ml.output_data_dir, arcname=".")
    output = launch.client("sagemaker").describe_training_job(TrainingJobName=name)
    bucket, _, prefix = output["OutputDataConfig"]["S3OutputPath"][5:].partition("/")
    key = f"{prefix.rstrip('/')}/{name}/output/output.tar.gz"
    launch.client("s3").upload_file(str(job.base / "output.tar.gz"), bucket, key)

    done = launch.ok("report", name, "--debug-path", str(tensors), "--out", "page.html")
    lines = done.stdout.splitlines()
    assert lines[0] == f"training job {name}: Completed"
    assert lines[1] == f"job reports -> page-{name}/"
    evaluation = json.loads((job.opt_ml.output_data_dir / "evaluation.json").read_text())
    accuracy = evaluation["splits"]["test"]["accuracy"]
    assert f"test: accuracy {accuracy:.4f}" in lines
    assert (
        "no rule evaluation statuses reported yet (configured: LossNotDecreasing, "
        "VanishingGradient, Overfit, Overtraining, PoorWeightInitialization)"
    ) in lines
    assert any(x.startswith("metrics over time unavailable: ") for x in lines)  # moto: none
    (debugger,) = [
        m for x in lines if (m := re.fullmatch(r"debugger: 2 loss curves, (\d+) layers.*", x))
    ]
    assert int(debugger[1]) >= 1  # the new head at least (the backbone may be frozen)
    assert lines[-1] == "report -> page.html"
    reports = launch.cwd / f"page-{name}"
    for report in ("evaluation.html", "evaluation.json", "profile.html", "profile.json"):
        assert (reports / report).read_bytes() == (job.opt_ml.output_data_dir / report).read_bytes()

    page = (launch.cwd / "page.html").read_text()
    assert f'<a href="page-{name}/profile.html">profile.html</a>' in page
    assert page.count('src="data:image/png;base64,') == 2  # losses per mode, gradient norms
    assert "<td>CrossEntropyLoss_output_0 (TRAIN)</td><td>16</td>" in page  # 8 steps x 2 epochs
    assert "<td>CrossEntropyLoss_output_0 (EVAL)</td>" in page
    assert "<td>ResNet_fc.weight</td>" in page
    assert "LossNotDecreasing" in page


def test_report_without_reachable_debug_output_says_why(launch: Launch) -> None:
    """The job's own S3 debug output: nothing there in moto; smdebug would wait forever."""
    name = _train_job(launch)
    done = launch.ok("report", name, "--out", "page.html")
    expected = f"s3://{BUCKET}/dog-classifier/debug/{name}/debug-output"
    assert (
        f"Debugger output at {expected} not readable: nothing uploaded under collections/ yet"
        in done.stdout
    )

    plain = _train_job(launch, "--no-debugger")
    done = launch.ok("report", plain, "--out", "plain.html")
    assert "no Debugger rules configured for this job" in done.stdout
    assert "no Debugger output: the job has no DebugHookConfig" in done.stdout
    assert (launch.cwd / "plain.html").read_text().startswith("<!doctype html>")
    assert f"the job's own reports: no s3://{BUCKET}/" in done.stdout


def test_report_of_an_unknown_job_is_one_line(launch: Launch) -> None:
    line = one_line_error(launch("report", "no-such-job"))
    assert "DescribeTrainingJob: ValidationException: Could not find training job" in line


def test_findings_flag_flat_losses_and_vanishing_gradients() -> None:
    analysis = DebugAnalysis(
        "x",
        losses={
            "loss (TRAIN)": {0: 1.0, 1: 1.1, 2: 1.2, 3: 1.3},
            "loss (EVAL)": {0: 2.0, 1: 2.5},
            "ok (TRAIN)": {0: 2.0, 1: 1.5, 2: 1.0, 3: 0.5},
        },
        gradient_norms={"ResNet_fc.weight": {0: 0.3}, "ResNet_conv1.weight": {0: 1e-9, 2: 2e-9}},
    )
    assert findings(analysis) == [
        "loss (TRAIN): not decreasing (1.0000 -> 1.3000)",
        "gradient of ResNet_conv1.weight: vanishing (max L2 norm 2.00e-09)",
    ]


def test_launch_commands_do_not_import_torch() -> None:
    """smdebug.trials imports torch; the report imports it only when it reads tensors."""
    code = (
        "import sys, launch.report, launch.training, launch.tuning; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'smdebug.trials' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
