"""Image size and cold start: how big the image is, where the bytes go, and how soon it serves.

Measures a built image (default `byoc:test`, built as the container tests build it if missing):
its size and what takes the space, from the files in a container of it; the size of the CPU
flavour, computed rather than built, since its torch index is not reachable here (the CUDA-only
packages and the CUDA torch out, a CPU torch wheel from this disk in); and the seconds from
`docker run IMAGE serve` to the first HTTP answer and to a 200 from /ping, for a model trained in
the image and handed over both as the flat /opt/ml/model folder `train` writes and as a
model.tar.gz in that folder. Rewrites the `image` section of docs/image.md (the measured half;
the prose above it is by hand); progress goes to stderr and the section to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench._cli import add_output_argument, command, log_to_stderr, work_in
from bench._markdown import replace_section, table
from bench._report import machine
from bench._runs import REPO, host_cores
from bench._serve_servers import free_ports
from container.model import WEIGHTS_FILE
from container.sagemaker_env import OptMl
from container.sample_data import SampleSpec, make_opt_ml

__all__ = ["BenchSettings", "main"]

logger = logging.getLogger(__name__)

SERVERLESS_CAP = 10 * 10**9
"""SageMaker serverless inference's largest image: "10 GB", read strictly
(docs/sagemaker-contract.md §1.2)."""
SERVERLESS_PING_S = 180.0
"""Serverless: the model must download and /ping answer 200 within 3 minutes."""
_CPU_WHEEL = Path("/opt/wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl")
# Tiny training, but at 224 px: the server warms up at the model's image size (at batch 1 and at
# its largest batch), and ResNet-18's weights barely depend on the number of classes.
_HYPERPARAMETERS = {
    "epochs": 1,
    "batch_size": 8,
    "image_size": 224,
    "pretrained": False,
    "workers": 0,
    "warmup_epochs": 0,
}
_LAYOUTS = ("flat /opt/ml/model", "model.tar.gz")
_POLL_S = 0.05
_MB = 10**6

# Run by the image's Python (no arguments: its venv) and by ours (a `pip --target` folder):
# bytes of regular files per installed distribution (from its RECORD) and per folder. Folders
# themselves and repeated hard links do not count, as in docker's image Size.
_FILES_PY = """
import importlib.metadata, json, os, sys, sysconfig
def tree(top):
    dev, seen, total = os.lstat(top).st_dev, set(), 0
    for root, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.lstat(os.path.join(root, d)).st_dev == dev]
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if st.st_dev == dev and st.st_ino not in seen:
                seen.add(st.st_ino)
                total += st.st_size
    return total
site = sys.argv[1] if len(sys.argv) > 1 else sysconfig.get_path("purelib")
folders = [site] if len(sys.argv) > 1 else ["/", "/opt", sys.prefix, site]
packages = {}
for dist in importlib.metadata.distributions(path=[site]):
    paths = {dist.locate_file(f) for f in dist.files or ()}
    size = sum(os.lstat(p).st_size for p in paths if os.path.lexists(p))
    packages[dist.metadata["Name"]] = [dist.version, size]
print(json.dumps({"python": sys.version.split()[0], "prefix": sys.prefix, "site": site,
                  "folders": {f: tree(f) for f in folders}, "packages": packages}))
"""


@dataclass(frozen=True)
class BenchSettings:
    """Which image, how many cold starts per layout, the CPU wheel, where the document goes."""

    image: str
    base_image: str  # for a build when `image` is missing
    runs: int
    cpu_wheel: Path
    output: Path
    command: str  # how this run was started, for the document


@dataclass(frozen=True)
class Files:
    """What `_FILES_PY` found: file bytes per folder and (version, bytes) per distribution."""

    python: str
    prefix: str
    site: str
    folders: dict[str, int]
    packages: dict[str, tuple[str, int]]

    def group(self, name: str) -> list[str]:
        return sorted(p for p in self.packages if _group(p) == name)

    def size(self, names: Sequence[str]) -> int:
        return sum(self.packages[n][1] for n in names)


@dataclass(frozen=True)
class ColdStart:
    """Seconds from just before `docker run --detach ... serve` until each milestone."""

    layout: str
    run: int
    host_cores: float  # `host_cores()` just before the run
    started_s: float  # `docker run --detach` returned
    first_answer_s: float  # the first HTTP response from /ping, 503 included
    ready_s: float  # the first 200


def _group(name: str) -> str:
    """torch, triton, cuda (what torch's CUDA wheel requires and its CPU wheel does not), rest."""
    key = name.lower().replace("_", "-")
    if key in ("torch", "triton"):
        return key
    # nvidia-ml-py is the project's own dependency (pynvml), not one of torch's.
    return "cuda" if key.startswith(("nvidia-", "cuda-")) and key != "nvidia-ml-py" else "rest"


def _docker(*args: str, timeout: float = 900) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:3])} ... exited {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")  # fmt: skip
    return done.stdout


def _image_id(settings: BenchSettings) -> str:
    """The image's ID, building it first if missing: every later step uses the ID, not the tag."""
    try:
        return _docker("image", "inspect", "--format", "{{.Id}}", settings.image).strip()
    except RuntimeError:
        logger.info("No %s: building it as tests/container/conftest.py does", settings.image)
    _docker(
        "build",
        "--build-arg", f"BASE_IMAGE={settings.base_image}",
        "--build-arg", "TORCH_INDEX_URL=",
        "--build-arg", "TORCH_CUDA=13.0",  # PyPI's torch
        "--build-arg", "BAKE_WEIGHTS=0",
        "--tag", settings.image,
        str(REPO),
        timeout=1800,
    )  # fmt: skip
    return _docker("image", "inspect", "--format", "{{.Id}}", settings.image).strip()


def _files(output: str) -> Files:
    found = json.loads(output)
    packages = {name: (v, int(size)) for name, (v, size) in found["packages"].items()}
    return Files(found["python"], found["prefix"], found["site"], found["folders"], packages)


def _cpu_torch(wheel: Path, work: Path) -> Files:
    """The CPU torch wheel as installed: `pip install --no-deps --target`, then measured."""
    target = work / "cpu-torch"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-index", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
    )  # fmt: skip
    return _files(
        subprocess.check_output([sys.executable, "-c", _FILES_PY, str(target)], text=True)
    )


def _train(image: str, work: Path) -> Path:
    """An /opt/ml tree trained by `docker run IMAGE train` on the sample dataset; its model dir."""
    opt_ml = OptMl(make_opt_ml(work / "train", SampleSpec(), _HYPERPARAMETERS))
    _docker("run", "--rm", "--volume", f"{opt_ml.base}:/opt/ml", image, "train")
    return opt_ml.model_dir


def _serving_trees(model_dir: Path, work: Path) -> dict[str, Path]:
    """An /opt/ml tree per layout: the artifact's files in model/, or model/model.tar.gz of them."""
    flat, tarred = OptMl(work / "flat"), OptMl(work / "tarred")
    shutil.copytree(model_dir, flat.model_dir)
    tarred.model_dir.mkdir(parents=True)
    with tarfile.open(tarred.model_dir / "model.tar.gz", "w:gz") as archive:
        for path in sorted(model_dir.iterdir()):
            archive.add(path, arcname=path.name)
    return dict(zip(_LAYOUTS, (flat.base, tarred.base), strict=True))


def _cold_start(image: str, layout: str, opt_ml: Path, run: int) -> ColdStart:
    """`docker run --detach ... serve`, then GET /ping every 50 ms until it says 200."""
    cores = host_cores()
    (port,) = free_ports(1)
    name = f"bench-image-{os.getpid()}-{port}"
    url = f"http://127.0.0.1:{port}/ping"
    started = time.monotonic()
    _docker("run", "--detach", "--name", name, "--volume", f"{opt_ml}:/opt/ml",
            "--publish", f"127.0.0.1:{port}:8080", image, "serve")  # fmt: skip
    try:
        created = time.monotonic() - started
        first: float | None = None
        while time.monotonic() - started < SERVERLESS_PING_S:
            try:
                status: int | None = httpx.get(url, timeout=10).status_code
            except httpx.TransportError:  # not listening yet (docker's proxy drops the request)
                status = None
            now = time.monotonic() - started
            first = now if first is None and status is not None else first
            if status == 200:
                assert first is not None
                return ColdStart(layout, run, cores, created, first, now)
            time.sleep(_POLL_S)
        logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True, check=False)
        raise RuntimeError(
            f"no 200 from /ping in {SERVERLESS_PING_S:.0f} s:\n{logs.stderr[-3000:]}"
        )
    finally:
        _docker("rm", "--force", name)


def _mb(size: int) -> str:
    return f"{size / _MB:,.0f}" if size >= 10 * _MB else f"{size / _MB:.1f}"


def _share(size: int, whole: int) -> str:
    return f"{100 * size / whole:.1f}%"


def _cuda_version(files: Files) -> str:
    runtime = files.packages.get("nvidia-cuda-runtime")
    return "CUDA " + ".".join(runtime[0].split(".")[:2]) if runtime else "unknown CUDA"


def _size_table(files: Files, image_size: int) -> str:
    f, venv, site = files.folders, files.folders[files.prefix], files.folders[files.site]
    cuda, triton, torch = (files.size(files.group(g)) for g in ("cuda", "triton", "torch"))
    parts = [
        ("Debian and its python3 (everything outside /opt)", f["/"] - f["/opt"]),
        ("/opt/venv", venv),
        (f"/opt/venv: CUDA libraries ({len(files.group('cuda'))} packages, below)", cuda),
        ("/opt/venv: triton (torch.compile's GPU compiler)", triton),
        (f"/opt/venv: torch {files.packages['torch'][0]}", torch),
        (f"/opt/venv: the rest of site-packages ({len(files.group('rest'))} packages)",
         site - cuda - triton - torch),
        ("/opt/venv: outside site-packages (interpreter links, scripts)", venv - site),
        ("/opt/program and /opt/torch (our code; baked weights)", f["/opt"] - venv),
        ("all files in a container of the image", f["/"]),
        ("`docker image inspect` Size", image_size),
    ]  # fmt: skip
    rows = [[name, _mb(size), _share(size, image_size)] for name, size in parts]
    return table(["part", "MB", "of Size"], rows)


def _largest_table(files: Files, count: int = 12) -> str:
    largest = sorted(files.packages.items(), key=lambda item: -item[1][1])[:count]
    rows = [[name, _group(name), version, _mb(size)] for name, (version, size) in largest]
    return table(["distribution", "group", "version", "MB"], rows, labels=3)


def _cpu_tables(files: Files, image_size: int, cpu: Files, wheel: Path) -> tuple[str, str]:
    """The CPU flavour's computation, and both flavours against the serverless limit."""
    cuda = files.size(files.group("cuda") + files.group("triton"))
    (version, torch), (cpu_version, cpu_torch) = files.packages["torch"], cpu.packages["torch"]
    computed = image_size - cuda - torch + cpu_torch
    terms = [
        ["CUDA image, measured (`docker image inspect` Size)", _mb(image_size)],
        ["minus its CUDA libraries and triton, as installed", f"-{_mb(cuda)}"],
        [f"minus its torch {version}, as installed", f"-{_mb(torch)}"],
        [
            f"plus torch {cpu_version} (the wheel in {wheel.parent}), installed",
            f"+{_mb(cpu_torch)}",
        ],
        ["**CPU flavour, computed**", f"**{_mb(computed)}**"],
    ]
    cap = [
        [name, f"{size / 10**9:.2f}", _share(size, SERVERLESS_CAP)]
        for name, size in (("CUDA (measured)", image_size), ("CPU (computed)", computed))
    ]
    return table(["term", "MB"], terms), table(["flavour", "GB", "of 10 GB"], cap)


def _cold_start_tables(starts: Sequence[ColdStart]) -> tuple[str, str]:
    """Median and max per layout, and every run."""
    summary = []
    for layout in _LAYOUTS:
        first = [s.first_answer_s for s in starts if s.layout == layout]
        ready = [s.ready_s for s in starts if s.layout == layout]
        summary.append([layout, len(ready), f"{statistics.median(first):.2f}",
                        f"{max(first):.2f}", f"**{statistics.median(ready):.2f}**",
                        f"{max(ready):.2f}"])  # fmt: skip
    header = ["model", "runs", "first answer: median s", "max s", "200: median s", "max s"]
    every = [[s.layout, s.run, f"{s.host_cores:.2f}", f"{s.started_s:.2f}",
              f"{s.first_answer_s:.2f}", f"{s.ready_s:.2f}"] for s in starts]  # fmt: skip
    every_header = ["model", "run", "host cores", "`docker run` returned s", "first answer s",
                    "200 s"]  # fmt: skip
    return table(header, summary, labels=2), table(every_header, every, labels=2)


@dataclass(frozen=True)
class Measured:
    """Everything the document reports."""

    image_id: str
    image_size: int
    files: Files  # in the image
    cpu: Files  # the CPU torch wheel, installed
    starts: list[ColdStart]
    model_bytes: int  # model.pt
    tarball_bytes: int  # model.tar.gz
    docker_version: str


def render(m: Measured, settings: BenchSettings, seconds: float) -> str:
    """The measured section of docs/image.md."""
    files, size = m.files, m.image_size
    torch, cpu_torch = files.packages["torch"][0], m.cpu.packages["torch"][0]
    torchvision = _mb(files.size(["torchvision"]))
    cuda_share = _share(files.size(files.group("cuda") + files.group("triton")), size)
    cpu_terms, cap = _cpu_tables(files, size, m.cpu, settings.cpu_wheel)
    summary, every = _cold_start_tables(m.starts)
    hyperparameters = ", ".join(f"{k}={v}" for k, v in _HYPERPARAMETERS.items())
    return f"""How big the image is, where its bytes go, and how soon a fresh container
answers /ping with 200, measured by `bench/image.py`. MB and GB are 10^6 and 10^9 bytes, as docker
prints them.

## Size

`{settings.image}` (`{m.image_id[7:19]}`), the CUDA flavour as the container tests build it:
`--build-arg TORCH_INDEX_URL= --build-arg TORCH_CUDA=13.0 --build-arg BAKE_WEIGHTS=0`
on a Debian bookworm base, so PyPI's torch {torch} ({_cuda_version(files)}, its CUDA libraries as
pip packages) and no baked weights, since neither download.pytorch.org nor the weights host
is reachable here. The Dockerfile's
defaults install the cu126 build instead (not measured) and add ResNet-18's ImageNet weights
(about 47 MB) in /opt/torch. Sizes count the bytes of regular files, as docker's Size does
(folders and repeated hard links not), from a walk of a container's file system and from each
installed distribution's RECORD.

{_size_table(files, size)}

The files found add up to docker's Size within {abs(size - files.folders["/"]):,} bytes. The
largest installed distributions:

{_largest_table(files)}

The CUDA libraries are {", ".join(files.group("cuda"))}. With triton they are {cuda_share} of the
image. triton serves only `torch.compile`, which neither `train` nor `serve` uses; leaving it out
would save {_mb(files.size(["triton"]))} MB (not tried: torch's CUDA wheel requires it).

## CPU flavour (computed, not built)

{cpu_terms}

The CPU flavour (`--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
--build-arg TORCH_CUDA=cpu`) cannot be built here: download.pytorch.org is not reachable. Its
size is computed from the measured CUDA
image: out go the packages torch's CUDA wheel requires and its CPU wheel does not (compare the
two wheels' `Requires-Dist`: the CUDA libraries above and triton) and the CUDA torch itself; in
comes the CPU-only torch wheel on this disk, installed with `pip install --no-deps --target` and
measured like the image's packages. Everything else stays. That wheel is torch {cpu_torch}, a
release behind the image's torch {torch}. The CPU index would also bring a CPU torchvision,
smaller by its CUDA kernels; not counted (the image's torchvision is {torchvision} MB in all).

SageMaker serverless inference takes images up to 10 GB (taken as 10^10 bytes) and runs on CPUs
only, so the CPU flavour is the one for it:

{cap}

## Cold start to a 200 /ping

Seconds from `docker run --detach --publish 127.0.0.1:PORT:8080 --volume OPT_ML:/opt/ml IMAGE
serve` until GET /ping first answers at all (503 while the model loads) and until it first says
200 (model loaded, traced and warmed up), polling every {_POLL_S * 1000:.0f} ms; {settings.runs}
runs per model layout, the layouts taking turns. Measured on this 2-core machine, on its CPU: a
GPU host adds CUDA's start-up, a bigger CPU takes less.

{summary}

Every run, in the order they ran ("host cores": how many cores a 2-thread matmul got just before
the run, 2.0 on a quiet host):

{every}

SageMaker serverless inference allows {SERVERLESS_PING_S / 60:.0f} minutes for the model download
and the first 200 together; the script fails a run that takes longer.

### Method

- Model: a ResNet-18 trained in the image (`docker run --rm --volume OPT_ML:/opt/ml IMAGE
  train`) on `container.sample_data`'s default dataset ({SampleSpec().classes} classes), with
  {hyperparameters}. The training is tiny, but the artifact is a whole ResNet-18 (model.pt
  {_mb(m.model_bytes)} MB; the number of classes changes only its last layer, 0.5 MB per 256
  classes), and the server warms it up at its 224 px input at batch 1 and at its largest batch
  (16 on a CPU), so start-up costs what a real model's does.
- Layouts: "{_LAYOUTS[0]}" is the folder `train` writes, which is also what an endpoint sees
  (SageMaker unpacks model.tar.gz into /opt/ml/model before the container starts);
  "{_LAYOUTS[1]}" is the same files packed into /opt/ml/model/model.tar.gz
  ({_mb(m.tarball_bytes)} MB), which the server unpacks into /tmp first, as when the archive
  itself is mounted.
- The clock starts just before `docker run`, so it includes creating the container. The image is
  already on disk (no pull), and its files are likely in the page cache from the runs before.
  Each container is removed afterwards (`docker rm --force`).
- Others may use this machine's 2 cores at the same time; "host cores" shows how busy it was.

## Machine

{machine()}
- docker: {m.docker_version}
- image: `{settings.image}` (`{m.image_id}`), python {files.python}, torch {torch}

Reproduce with `make bench-image`, which runs `{settings.command}` ({seconds / 60:.0f} min here).
"""


def _measure(settings: BenchSettings, work: Path) -> Measured:
    image_id = _image_id(settings)
    image_size = int(_docker("image", "inspect", "--format", "{{.Size}}", image_id))
    files = _files(_docker("run", "--rm", image_id, "python", "-c", _FILES_PY))
    logger.info("%s: Size %d bytes, its files %d", settings.image, image_size, files.folders["/"])
    cpu = _cpu_torch(settings.cpu_wheel, work)
    logger.info("Training a model in the image")
    model_dir = _train(image_id, work)
    trees = _serving_trees(model_dir, work)
    starts = []
    for run in range(1, settings.runs + 1):
        for layout, opt_ml in trees.items():
            starts.append(s := _cold_start(image_id, layout, opt_ml, run))
            logger.info("%s, run %d: first answer %.2f s, 200 after %.2f s (host cores %.2f)",
                        layout, run, s.first_answer_s, s.ready_s, s.host_cores)  # fmt: skip
    return Measured(
        image_id=image_id,
        image_size=image_size,
        files=files,
        cpu=cpu,
        starts=starts,
        model_bytes=(model_dir / WEIGHTS_FILE).stat().st_size,
        tarball_bytes=(OptMl(trees[_LAYOUTS[1]]).model_dir / "model.tar.gz").stat().st_size,
        docker_version=_docker("version", "--format", "{{.Server.Version}}").strip(),
    )


def main(settings: BenchSettings) -> str:
    """Measure, write the `image` section of `settings.output` and return it."""
    started = time.monotonic()
    if not settings.cpu_wheel.is_file():
        raise FileNotFoundError(f"no CPU torch wheel at {settings.cpu_wheel}; pass --cpu-wheel")
    with work_in(None, "bench-image-") as work:
        measured = _measure(settings, work)
    document = render(measured, settings, time.monotonic() - started)
    replace_section(settings.output, "image", document)
    logger.info("Wrote %s after %.0f s", settings.output, time.monotonic() - started)
    return document


def _parse(argv: list[str] | None = None) -> BenchSettings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", nargs="?", default="byoc:test", help="default: byoc:test")
    parser.add_argument(
        "--base-image",
        default=os.environ.get("TEST_BASE_IMAGE", "byoc-base:bookworm"),
        help="BASE_IMAGE for a build when the image is missing (default: $TEST_BASE_IMAGE or "
        "byoc-base:bookworm, as the container tests)",
    )
    parser.add_argument("--runs", type=int, default=5, help="cold starts per layout (default: 5)")
    parser.add_argument(
        "--cpu-wheel",
        type=Path,
        default=_CPU_WHEEL,
        help=f"CPU-only torch wheel for the CPU flavour's size (default: {_CPU_WHEEL})",
    )
    add_output_argument(parser, "image.md", "whose `image` section to rewrite")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return BenchSettings(
        image=args.image,
        base_image=args.base_image,
        runs=args.runs,
        cpu_wheel=args.cpu_wheel,
        output=args.output,
        command=command("bench.image", argv),
    )


if __name__ == "__main__":
    log_to_stderr()
    print(main(_parse()))
