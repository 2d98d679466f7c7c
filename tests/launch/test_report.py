"""`launch report` on a job in moto, with the output of a real `train` run: its own reports and
verdicts, and its tensors read by smdebug."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import tarfile

import pytest

from launch.report import DebugAnalysis, findings
from launch.tensor_rules import RULES
from tests.conftest import FAST, Job
from tests.launch.conftest import Launch, one_line_error
from tests.launch.test_training import training_job

BUCKET = "report-bucket"


def _train_job(launch: Launch, *flags: str) -> str:
    launch.client("s3").create_bucket(Bucket=BUCKET)
    done = launch.ok("train", "--bucket", BUCKET, "--no-wait", *flags)
    return training_job(done.stdout)


def _upload_output(launch: Launch, job: Job, name: str) -> None:
    """What SageMaker does at the job's end: /opt/ml/output/data to S3 as output.tar.gz."""
    with tarfile.open(job.base / "output.tar.gz", "w:gz") as tar:
        tar.add(job.opt_ml.output_data_dir, arcname=".")
    output = launch.client("sagemaker").describe_training_job(TrainingJobName=name)
    bucket, _, prefix = output["OutputDataConfig"]["S3OutputPath"][5:].partition("/")
    key = f"{prefix.rstrip('/')}/{name}/output/output.tar.gz"
    launch.client("s3").upload_file(str(job.base / "output.tar.gz"), bucket, key)


def test_report_of_a_job_without_debugger_shows_its_own_verdicts_and_tensors(
    launch: Launch, job: Job, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real `train` run with save_tensors=true, as `launch train --debugger auto` starts it when
    SageMaker refuses Debugger: its output.tar.gz holds its reports, its own rule verdicts and
    profiler findings, and debug-tensors/, on which the report runs Debugger's rules itself."""
    job.set_hyperparameters(FAST, save_tensors=True)
    run = job.run()
    assert run.returncode == 0, run.stderr
    name = _train_job(launch)
    _upload_output(launch, job, name)

    done = launch.ok("report", name, "--out", "page.html")
    lines = done.stdout.splitlines()
    page = (launch.cwd / "page.html").read_text()
    assert lines[0] == f"training job {name}: Completed"
    assert lines[1] == f"job reports -> page-{name}/"
    evaluation = job.report("evaluation.json")
    accuracy = evaluation["splits"]["test"]["accuracy"]
    assert f"test: accuracy {accuracy:.4f}" in lines
    said = evaluation["findings"]
    assert any(f["text"].startswith("Calibration:") for f in said)
    for finding in said:
        assert f"{finding['kind']}: {finding['text']}" in lines
        assert html.escape(finding["text"], quote=False) in page

    # The job's own verdicts: a table each at the top of the page, a line per one that fired.
    assert page.index("<h2>The job's own verdicts</h2>") < page.index("<h2>Final metrics</h2>")
    rules = evaluation["rules"]
    fired = [r for r in rules if r["status"] == "issues_found"]
    assert f"the job's own rules: {len(fired)} of {len(rules)} fired" in lines
    for rule in rules:
        assert f"<td>{rule['name']}</td><td>{rule['status']}</td>" in page
    for rule in fired:
        line = f"job rule {rule['name']}: issues_found at step {rule['step']}: {rule['message']}"
        assert line in lines
    findings = job.report("profile.json")["findings"]
    noted = [f for f in findings if f["verdict"] not in ("ok", "not_evaluated")]
    assert f"the job's own findings: {len(noted)} of {len(findings)} fired" in lines
    for finding in findings:
        assert f"<td>{finding['name']}</td><td>{finding['verdict']}</td>" in page
    for finding in noted:
        assert any(x.startswith(f"job finding {finding['name']}: ") for x in lines)
    # The service's rules: configured by `launch train` (moto runs none).
    assert (
        "no rule evaluation statuses reported yet (configured: LossNotDecreasing, "
        "VanishingGradient, Overfit, Overtraining, PoorWeightInitialization)"
    ) in lines
    assert any(x.startswith("metrics over time unavailable: ") for x in lines)  # moto: none

    # The tensors, from output.tar.gz's debug-tensors/, with Debugger's rules run on them here.
    (debugger,) = [
        m for x in lines if (m := re.fullmatch(r"debugger: 2 loss curves, (\d+) layers.*", x))
    ]
    assert int(debugger[1]) >= 1  # the new head at least (the backbone may be frozen)
    for rule in RULES:
        (line,) = [x for x in lines if x.startswith(f"smdebug rule {rule}: ")]
        assert line.split(": ")[1].split(" ")[0] in ("ok", "issues_found"), line
    assert page.count('src="data:image/png;base64,') == 2  # losses per mode, gradient norms
    assert "<td>CrossEntropyLoss_output_0 (TRAIN)</td><td>16</td>" in page  # 8 steps x 2 epochs
    assert "<td>CrossEntropyLoss_output_0 (EVAL)</td>" in page
    assert "<td>ResNet_fc.weight</td>" in page
    assert lines[-1] == "report -> page.html"
    reports = launch.cwd / f"page-{name}"
    for report in ("evaluation.html", "evaluation.json", "profile.html", "profile.json"):
        assert (reports / report).read_bytes() == (job.opt_ml.output_data_dir / report).read_bytes()
    assert f'<a href="page-{name}/profile.html">profile.html</a>' in page
    assert (reports / "debug-tensors" / "collections").is_dir()

    # A laptop install has neither smdebug nor torch: the report says what to install, once.
    shadow = launch.cwd / "without-smdebug" / "smdebug"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'smdebug'\", name='smdebug')\n"
    )
    # What PYTHONPATH would do for a process of its own: this process has smdebug imported.
    for module in [m for m in sys.modules if m.partition(".")[0] == "smdebug"]:
        monkeypatch.delitem(sys.modules, module)
    monkeypatch.syspath_prepend(shadow.parent)
    bare = launch("report", name, "--out", "bare.html")
    assert bare.returncode == 0, bare.stderr
    (line,) = [x for x in bare.stdout.splitlines() if "smdebug" in x]
    assert line == (
        f"tensors at bare-{name}/debug-tensors not analysed: the analysis needs "
        "`pip install smdebug torch` (No module named 'smdebug')"
    )
    assert f"the job's own rules: {len(fired)} of {len(rules)} fired" in bare.stdout


def test_report_without_reachable_debug_output_says_why(launch: Launch) -> None:
    """The job's own S3 debug output: nothing there in moto; smdebug would wait forever."""
    name = _train_job(launch)
    done = launch.ok("report", name, "--out", "page.html")
    expected = f"s3://{BUCKET}/dog-classifier/debug/{name}/debug-output"
    assert (
        f"Debugger output at {expected} not readable: nothing uploaded under collections/ yet"
        in done.stdout
    )

    plain = _train_job(launch, "--debugger", "off")
    done = launch.ok("report", plain, "--out", "plain.html")
    assert "no Debugger rules configured for this job" in done.stdout
    assert (
        "no Debugger output: the job has no DebugHookConfig, no debug-tensors/ in its "
        "output.tar.gz, and no --debug-path was given"
    ) in done.stdout
    assert "the job's own rules: none (no evaluation.json)" in done.stdout
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
