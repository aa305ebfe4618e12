#!/usr/bin/env bash
# Sets up a virtual environment with everything the project needs (idempotent).
#
#   bash scripts/setup.sh            # .venv in the repository root
#   VENV=/path/to/env bash scripts/setup.sh
#
# Without an NVIDIA GPU it installs the CPU build of torch and never pulls CUDA
# packages: torchvision (required unpinned by nnsight and sae-bench) would drag in
# the newest CUDA torch, and the registry's torchvision is built against CUDA torch,
# which breaks `import transformers` next to a CPU torch. Nothing this project uses
# imports torchvision, so on CPU it is constrained away and removed.
# With a GPU (nvidia-smi works) the default CUDA build of torch is installed and
# torchvision is kept. Override the torch requirement with TORCH_SPEC, and point pip
# at another index for it with TORCH_INDEX_URL (for example
# https://download.pytorch.org/whl/cpu or https://download.pytorch.org/whl/cu124).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet --upgrade pip setuptools wheel

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HAS_GPU=1
    TORCH_SPEC=${TORCH_SPEC:-torch}
else
    HAS_GPU=0
    TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
fi

TORCH_ARGS=()
if [ -n "${TORCH_INDEX_URL:-}" ]; then
    TORCH_ARGS+=(--extra-index-url "$TORCH_INDEX_URL")
fi

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC (gpu=$HAS_GPU)"
    "$PY" -m pip install --quiet "${TORCH_ARGS[@]}" "$TORCH_SPEC"
fi
TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")

# Keep whatever torch is installed now: later resolution must not replace it.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$TORCH_VERSION" > "$CONSTRAINTS"

echo "[setup] installing matryoshka_plugin and its dependencies (torch $TORCH_VERSION)"
"$PY" -m pip install --quiet -c "$CONSTRAINTS" "${TORCH_ARGS[@]}" -e ".[test]"

if [ "$HAS_GPU" = 0 ] && "$PY" -m pip show torchvision >/dev/null 2>&1; then
    # See the header: the registry's torchvision is a CUDA build.
    "$PY" -m pip uninstall --quiet -y torchvision
fi

"$PY" - <<'PY'
import torch, dictionary_learning, nnsight, sae_lens, sae_bench, datasets, transformers  # noqa: F401
import matryoshka_plugin
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"nnsight {nnsight.__version__}, sae_lens {sae_lens.__version__}, "
      f"matryoshka_plugin {matryoshka_plugin.__version__}")
PY
