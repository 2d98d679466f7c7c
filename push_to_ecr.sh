#!/usr/bin/env bash
# Build the image for linux/amd64 and push it to ECR (creating the repository when missing), then
# print the pushed image's digest URI, the one line of stdout; everything else goes to stderr.
# See --help.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

usage() {
  cat <<EOF
Usage: ${0##*/} [options]

Build this repository's image for linux/amd64, tag it VERSION and latest, and push both to ECR,
creating the repository (scan on push, AES256 encryption) if it does not exist. The one line of
stdout is the pushed image by digest, REGISTRY/REPOSITORY@sha256:DIGEST: the exact image, which a
later push of VERSION or latest does not change (pin it in image_uri); VERSION and latest are on
stderr beside it. The commands run are shown on stderr.

Options:
  --region REGION        AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, then the CLI config)
  --account ID           account whose registry receives the image (default: the caller's, from STS)
  --repository NAME      ECR repository (default: sagemaker-dog-classifier)
  --tag VERSION          image version (default: 'git describe --tags --always --dirty', outside a
                         git checkout the version in pyproject.toml)
  --build-arg K=V        for docker build, repeatable: BASE_IMAGE, TORCH_INDEX_URL, TORCH_CUDA, BAKE_WEIGHTS
  --registry HOST[:PORT] push there instead of ACCOUNT.dkr.ecr.REGION.amazonaws.com (a VPC endpoint
                         or private registry)
  --dry-run              print the commands (pasteable after "+ ") and, on stdout, the URI
                         REGISTRY/REPOSITORY:VERSION (no digest before a push); change nothing
                         (it still asks STS for the account, ECR whether the repository exists,
                         and checks the docker engine)
  -h, --help             this help
EOF
}

die() {
  echo "${0##*/}: $*" >&2
  exit 1
}

need_value() { [ "$1" -ge 2 ] || die "$2 needs a value (see --help)"; }

# The arguments, shell-quoted into one line.
quote() {
  local line
  line=$(printf '%q ' "$@")
  echo "${line% }"
}

# Show a command (pasteable) and run it, unless this is a dry run. Its output goes to stderr:
# stdout is kept for the image.
run() {
  echo "+ $(quote "$@")" >&2
  [ -n "$dry_run" ] || "$@" >&2
}

region="" account="" tag="" registry="" dry_run=""
repository=sagemaker-dog-classifier
# linux/amd64: SageMaker's instances are x86; an Apple-silicon build fails there with "exec format
# error". `docker build` is BuildKit where the buildx plugin is installed (Docker Desktop) and the
# classic builder where it is not (Debian's docker.io); both honour --platform.
build_flags=(--platform linux/amd64)
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry-run) dry_run=1 ;;
    --region) need_value $# "$1"; region=$2; shift ;;
    --account) need_value $# "$1"; account=$2; shift ;;
    --repository) need_value $# "$1"; repository=$2; shift ;;
    --tag) need_value $# "$1"; tag=$2; shift ;;
    --registry) need_value $# "$1"; registry=$2; shift ;;
    --build-arg) need_value $# "$1"; build_flags+=(--build-arg "$2"); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

command -v aws >/dev/null ||
  die "the AWS CLI (aws) is not on PATH: install it (https://aws.amazon.com/cli/), then run 'aws configure'"
command -v docker >/dev/null ||
  die "docker is not on PATH: install Docker (Docker Desktop on a Mac) and start it"
region=${region:-${AWS_REGION:-${AWS_DEFAULT_REGION:-$(aws configure get region || true)}}}
[ -n "$region" ] ||
  die "no AWS region: pass --region, or set one with 'aws configure set region REGION' or AWS_DEFAULT_REGION"
# stdout and stderr together: on failure the last line is the CLI's reason, on success the account
# (the CLI's own warnings, if any, come first).
identity=$(aws sts get-caller-identity --region "$region" --query Account --output text 2>&1) ||
  die "no working AWS credentials: run 'aws configure' or set AWS_PROFILE (${identity##*$'\n'})"
account=${account:-${identity##*$'\n'}}
engine=$(docker version --format '{{.Server.Version}}' 2>&1) ||
  die "no docker engine answers: start Docker Desktop or dockerd, or fix DOCKER_HOST (${engine##*$'\n'})"
# SageMaker accepts only Docker v2 image manifests. BuildKit would by default attach a provenance
# attestation, which makes the pushed image an OCI image index, and with a builder other than the
# docker driver would not load the image into docker at all. The classic builder does neither and
# knows neither flag.
if [ "${DOCKER_BUILDKIT:-1}" != 0 ] && docker buildx version >/dev/null 2>&1; then
  build_flags+=(--provenance=false --load)
fi

registry=${registry:-$account.dkr.ecr.$region.amazonaws.com}
tag=${tag:-$(git -C "$ROOT" describe --tags --always --dirty 2>/dev/null ||
  sed -n 's/^version *= *"\(.*\)"$/\1/p' "$ROOT/pyproject.toml")}
[[ $tag =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] ||
  die "'$tag' is not a valid docker tag (letters, digits, '_', '.', '-'; at most 128): pass --tag"
image=$registry/$repository

ecr=(aws ecr --region "$region")
# Looking is harmless, so a dry run looks too, and shows the create only when it would run.
if ! "${ecr[@]}" describe-repositories --registry-id "$account" \
  --repository-names "$repository" >/dev/null 2>&1; then
  run "${ecr[@]}" create-repository --registry-id "$account" --repository-name "$repository" \
    --image-scanning-configuration scanOnPush=true --encryption-configuration encryptionType=AES256 \
    --query repository.repositoryUri --output text
fi
password=("${ecr[@]}" get-login-password)
login=(docker login --username AWS --password-stdin "$registry")
echo "+ $(quote "${password[@]}") | $(quote "${login[@]}")" >&2
[ -n "$dry_run" ] || "${password[@]}" | "${login[@]}" >&2
run docker build "${build_flags[@]}" --tag "$image:$tag" "$ROOT"
run docker tag "$image:$tag" "$image:latest"
run docker push "$image:$tag"
run docker push "$image:latest"
if [ -n "$dry_run" ]; then
  echo "$image:$tag"
  exit 0
fi
# The registry's digest of the manifest just pushed, which docker records after a push (the image
# may carry digests from other repositories too).
digest=""
for reference in $(docker image inspect --format '{{join .RepoDigests " "}}' "$image:$tag"); do
  if [[ $reference == "$image@sha256:"* ]]; then
    digest=$reference
  fi
done
[ -n "$digest" ] ||
  die "docker recorded no digest of $image in the push; see 'docker image inspect $image:$tag'"
echo "pushed $image:$tag and $image:latest as $digest" >&2
echo "$digest"
