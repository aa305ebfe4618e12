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
# On Python 3.11 the CPU set-up installs the verified set in requirements/cpu-py311.txt
# without resolution (USE_LOCK=0 resolves instead); elsewhere it resolves and then removes
# torchvision and nvidia-* wheels. With a GPU (nvidia-smi works) the default CUDA build of
# torch is installed and torchvision is kept. Override the torch requirement with TORCH_SPEC, and point pip
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

LOCK=requirements/cpu-py311.txt
PY_VERSION=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
installed=0
if [ "$HAS_GPU" = 0 ] && [ "$PY_VERSION" = 3.11 ] && [ "${USE_LOCK:-1}" = 1 ] && [ -f "$LOCK" ]; then
    # The verified CPU set, without resolution: torchvision and the nvidia-nccl wheel that
    # xgboost (via sae-probes) asks for are never downloaded.
    echo "[setup] installing the verified CPU dependency set ($LOCK)"
    if "$PY" -m pip install --quiet --no-deps -r "$LOCK" && "$PY" -m pip install --quiet --no-deps -e .; then
        installed=1
    else
        echo "[setup] the locked set did not install here; resolving dependencies instead"
    fi
fi
if [ "$installed" = 0 ]; then
    echo "[setup] installing matryoshka_plugin and its dependencies (torch $TORCH_VERSION)"
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" "${TORCH_ARGS[@]}" -e ".[test]"
fi

if [ "$HAS_GPU" = 0 ]; then
    # See the header: the registry's torchvision is a CUDA build, and no CUDA library is
    # needed without a GPU (xgboost runs on CPU without nccl).
    EXTRA=$("$PY" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | grep -i -E '^(torchvision|nvidia-.*)$' || true)
    if [ -n "$EXTRA" ]; then
        "$PY" -m pip uninstall --quiet -y $EXTRA
    fi
fi

"$PY" - <<'PY'
import torch, dictionary_learning, nnsight, sae_lens, sae_bench, datasets, transformers  # noqa: F401
import matryoshka_plugin
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"nnsight {nnsight.__version__}, sae_lens {sae_lens.__version__}, "
      f"matryoshka_plugin {matryoshka_plugin.__version__}")
PY
