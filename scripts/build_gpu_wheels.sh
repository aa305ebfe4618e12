#!/usr/bin/env bash
# Builds gpu_wheels/: the wheels scripts/gpu_check.sh installs, offline, on a GPU machine that has
# Python 3.12, torch, triton and numpy but none of dictionary_learning's dependencies and no
# network. Run it here (registries reachable); the folder travels beside the checkout (gitignored).
#
#   bash scripts/build_gpu_wheels.sh                      # cp312, manylinux x86_64, into gpu_wheels/
#   PY_VERSION=3.11 OUT=/tmp/w bash scripts/build_gpu_wheels.sh   # for a local dry run on 3.11
#
# Everything is downloaded with --no-deps: the list below is the smallest set that makes
# `dictionary_learning.training.trainSAE` and `dictionary_learning.trainers.matryoshka_batch_top_k`
# import (dictionary_learning's __init__ imports its ActivationBuffer, hence nnsight and
# transformers; training.py imports wandb), found by importing them in a venv holding only torch
# and numpy. Versions follow requirements/cpu-py311.txt. SAELens' training SAE is left out: its
# import chain reaches `datasets`, hence pandas and pyarrow (50 MB alone), over the 64 MiB budget.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY_VERSION=${PY_VERSION:-3.12}
OUT=${OUT:-gpu_wheels}
LIMIT_MB=${LIMIT_MB:-64}
LOCK=requirements/cpu-py311.txt

PACKAGES=(
  dictionary-learning einops tqdm                               # the trainers
  nnsight accelerate transformers tokenizers huggingface-hub safetensors regex pyyaml
  httpx2 httpcore2 h11 idna certifi truststore urllib3 requests xxhash pillow
  python-socketio python-engineio bidict packaging               # nnsight -> transformers
  wandb protobuf pydantic pydantic-core annotated-types typing-inspection click platformdirs
  opentelemetry-api                                              # trainSAE imports wandb
  pytest pluggy iniconfig pygments                               # the kernel tests
)

pinned() {  # "name==version" from the lock file, else the bare name
  local name=$1 line
  line=$(grep -i -E "^${name//[-_]/[-_]}==" "$LOCK" | head -1 || true)
  echo "${line:-$name}"
}

rm -rf "$OUT" && mkdir -p "$OUT"
specs=()
for p in "${PACKAGES[@]}"; do specs+=("$(pinned "$p")"); done
"$PYTHON" -m pip download --quiet --no-deps --only-binary :all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d "$OUT" "${specs[@]}"
# The project itself, as a wheel (the GPU machine need not have setuptools).
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$OUT" . || \
  "$PYTHON" -m pip wheel --quiet --no-deps -w "$OUT" .
rm -rf build
size_mb=$(du -sm "$OUT" | cut -f1)
echo "$OUT: $(ls "$OUT" | wc -l) wheels, ${size_mb} MiB (limit ${LIMIT_MB} MiB)"
if [ "$size_mb" -gt "$LIMIT_MB" ]; then
  echo "error: $OUT is over ${LIMIT_MB} MiB" >&2
  exit 1
fi
