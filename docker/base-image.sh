#!/usr/bin/env bash
# The base image for builds that cannot pull one (no registry reachable): a Debian minbase with
# Python 3.11, made with mmdebstrap from this machine's Debian mirror and imported as $1.
set -euo pipefail
tag=${1:-byoc-base:bookworm}
if docker image inspect "$tag" >/dev/null 2>&1; then
  exit 0
fi
# The Debian mirror of the apt sources (other repositories may be configured beside it).
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -m1 '/debian/\?$' ||
  grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -m1 '/debian/\?$' || true)
if [ -z "$mirror" ]; then
  echo "No Debian mirror found in the apt sources; pass BASE_IMAGE=an image you have." >&2
  exit 1
fi
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  bookworm - "$mirror" | docker import - "$tag" >/dev/null
echo "Made $tag from $mirror" >&2
