"""Data-parallel training over gloo: two processes on one host, and two "hosts" on one machine."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from container.sagemaker_env import OptMl
from tests.conftest import FAST, Job, TrainRun, free_port, wait_for_line


def test_two_processes_on_one_host_make_one_model_and_one_set_of_metric_lines(job: Job) -> None:
    job.set_hyperparameters(FAST, processes_per_host=2)
    run = job.run()
    assert run.returncode == 0, run.stderr
    assert "Joining gloo process group as rank 0/2" in run.stderr
    assert run.metric("epoch") == [1, 2]  # printed once, by rank 0
    assert len(run.metric("val_acc")) == 3
    assert job.failure() is None
    profile = job.report("profile.json")
    assert profile["setup"]["world_size"] == 2
    # Each process trains on half of the 64 images; the epoch counts all of them.
    assert [e["train_images"] for e in profile["epochs"]] == [64, 64]
    evaluation = job.report("evaluation.json")
    assert evaluation["splits"]["valid"]["images"] == 24  # every image once, none padded


def _host(job: Job, root: Path, name: str, hosts: list[str]) -> Job:
    """One host's /opt/ml: its own config files, the same data (FullyReplicated)."""
    host = Job(OptMl(root / name))
    shutil.copytree(job.base / "input", host.base / "input")
    host.write_config(
        "resourceconfig.json",
        {
            "current_host": name,
            "hosts": hosts,
            "current_instance_type": "ml.m5.xlarge",
            "network_interface_name": "lo",
        },
    )
    return host


def test_two_hosts_train_one_model_written_by_the_master_only(job: Job, tmp_path: Path) -> None:
    # The master must resolve by name, as algo-1 does on SageMaker; "localhost" does here.
    hosts = ["localhost", "algo-2"]
    master, worker = (_host(job, tmp_path, name, hosts) for name in hosts)
    env = {"MASTER_PORT": str(free_port())}
    processes = [host.start(env) for host in (master, worker)]
    runs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        runs.append(TrainRun(process.returncode, stdout, stderr))
    master_run, worker_run = runs
    assert master_run.returncode == 0, master_run.stderr
    assert worker_run.returncode == 0, worker_run.stderr
    assert master_run.metric("epoch") == [1, 2]
    assert worker_run.stdout == ""  # no metric lines from other ranks
    assert (master.opt_ml.model_dir / "model.pt").exists()
    assert not worker.opt_ml.model_dir.exists()  # model.tar.gz merges all hosts: no clashes
    assert not worker.opt_ml.output_data_dir.exists()
    assert master.report("profile.json")["setup"]["world_size"] == 2


def test_sigterm_reaches_every_process(job: Job) -> None:
    """`docker stop` signals PID 1 only: the parent forwards it, every rank stops at one step."""
    job.set_hyperparameters(FAST, processes_per_host=2, image_size=64, batch_size=4, epochs=3)
    process = job.start()
    wait_for_line(process, "Epoch 1/3")
    process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert time.monotonic() - sent < 120
    assert process.returncode == 0, stderr
    assert "Stopped in epoch 1" in stderr
    assert (job.opt_ml.model_dir / "model.pt").exists()
    assert job.failure() is None
