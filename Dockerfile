# One image for both SageMaker modes: `docker run IMAGE train` and `docker run IMAGE serve` run the
# root scripts of this repository from /opt/program (on PATH); any other command runs as given.
#
# Build arguments:
#   BASE_IMAGE       Debian or Ubuntu with Python >= 3.11 (bookworm has 3.11). The CUDA user-space
#                    libraries come with the torch wheel, so the same base serves CPU and GPU builds.
#   TORCH_INDEX_URL  where torch/torchvision come from: a CUDA 12.6 build by default; PyPI's is
#                    CUDA 13.0. Which driver each CUDA build needs and which SageMaker hosts and
#                    AMIs have it is the table in container/gpu_drivers.py (docs/image.md prints
#                    it). torch 2.14 is the last release with CUDA 12.6 wheels
#                    (pytorch/pytorch#190385). https://download.pytorch.org/whl/cpu for a slim CPU
#                    image; empty for PyPI's.
#   TORCH_CUDA       the CUDA version of that torch build ("12.6"; "13.0" for PyPI's; "cpu"), checked
#                    against the installed torch and written to the image label
#                    sagemaker-dog-classifier.cuda, from which `launch` picks the hosts' GPU driver.
#   BAKE_WEIGHTS     1: download torchvision's ImageNet ResNet18 weights into the image, so that
#                    `pretrained=true` works under network isolation; 0: leave them out.
ARG BASE_IMAGE=debian:bookworm-slim

FROM ${BASE_IMAGE} AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# What the install steps read, cut so that each changes only with what it installs: torch.txt,
# the torch and torchvision pins of constraints.txt; requirements.txt, pyproject.toml's dependency
# list (the extras' references to the project itself, its `torch` extra, listed out, since the
# project is not installed as a package). The build stage's COPY of a file that came out the same
# is a cache hit, so editing the code, the tool settings or another pin does not reinstall torch.
FROM runtime AS requirements
COPY pyproject.toml constraints.txt /src/
RUN grep -E '^(torch|torchvision)==' /src/constraints.txt > /torch.txt \
    && python3 -c 'import tomllib; p = tomllib.load(open("/src/pyproject.toml", "rb"))["project"]; \
extras = p["optional-dependencies"]; \
wanted = p["dependencies"] + extras["torch"] + extras["train"] + extras["serve"]; \
print("\n".join(r for r in wanted if not r.startswith(p["name"] + "[")))' > /requirements.txt

FROM runtime AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
COPY docker/ca/ /usr/local/share/ca-certificates/
# gcc: smdebug's profiler dependency (pyinstrument-cext) is published as source only.
RUN update-ca-certificates \
    && apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev python3-dev python3-venv \
    && python3 -m venv /opt/venv
# torch first, in a layer of its own (gigabytes): torchvision without its dependencies, whose
# numpy and pillow come next under their own pins instead of whatever is newest today.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
COPY --from=requirements /torch.txt /src/
RUN /opt/venv/bin/pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        $(grep '^torch==' /src/torch.txt) \
    && /opt/venv/bin/pip install --no-deps ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        $(grep '^torchvision==' /src/torch.txt)
# Everything else, under every pin; the torch above already satisfies its own. `pip check`: the
# set, torchvision's dependencies included, is complete and consistent.
COPY constraints.txt /src/
COPY --from=requirements /requirements.txt /src/
RUN /opt/venv/bin/pip install -c /src/constraints.txt -r /src/requirements.txt \
    && /opt/venv/bin/pip check
ARG TORCH_CUDA=12.6
RUN /opt/venv/bin/python -c 'import sys, torch; built = torch.version.cuda or "cpu"; \
sys.exit(0 if built == sys.argv[1] else f"torch is built for CUDA {built}, not {sys.argv[1]}: \
build with --build-arg TORCH_CUDA={built}")' "$TORCH_CUDA"
ARG BAKE_WEIGHTS=1
RUN mkdir -p /opt/torch && if [ "$BAKE_WEIGHTS" = 1 ]; then \
        TORCH_HOME=/opt/torch /opt/venv/bin/python -c \
        "import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')" \
        || { echo "Cannot download the ResNet18 weights; build with --build-arg BAKE_WEIGHTS=0" >&2; exit 1; }; \
    fi

# The project's code goes in last and on its own, so a code change rebuilds only these layers.
FROM runtime
ARG TORCH_CUDA=12.6
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch
COPY container /opt/program/container
COPY train serve /opt/program/
ENV PATH=/opt/program:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/program \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TORCH_HOME=/opt/torch
# multi-models: `serve` with SAGEMAKER_MULTI_MODEL=true answers SageMaker's /models API (CPU
# instances: AWS runs GPU multi-model endpoints with its Triton container only).
LABEL com.amazonaws.sagemaker.capabilities.accept-bind-to-port=true \
      com.amazonaws.sagemaker.capabilities.multi-models=true \
      sagemaker-dog-classifier.cuda=${TORCH_CUDA}
WORKDIR /opt/program
EXPOSE 8080
# SageMaker runs `IMAGE train` or `IMAGE serve`; a bare `docker run -p 8080:8080 IMAGE` serves.
CMD ["serve"]
