#!/usr/bin/env bash
# The GPU check, under 8 minutes on one H200: installs what it needs offline from gpu_wheels/
# (built on a networked machine by scripts/build_gpu_wheels.sh), then
#   1. the kernel tests on CUDA (Triton kernel against the torch reference in fp32 and bf16,
#      the kernels' self-check, the prefix loss and sparse encoder tests);
#   2. training-step speed at d=2304, F=65536, B=4096, k=64 and k=80: ms per step, tokens per
#      second, ratio to dictionary_learning's Matryoshka trainer (and SAELens' when it imports),
#      peak memory (benchmarks/speed.py);
#   3. a short trainSAE run in bf16 (scripts/gpu_check_train.py).
# It prints a compact summary and writes it, with every raw result, to $OUT (if set) or
# outputs/gpu_check/.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine
#   bash scripts/gpu_check.sh --cpu-dry-run   # here: the same steps on CPU at tiny shapes
#
# PYTHON (default python3) must see torch (and triton on the GPU). The wheels are installed with
# --no-deps into a folder of their own (TARGET, default /tmp/gpu_check_site) put on PYTHONPATH:
# the machine's environment is left as it is, and its torch, triton and numpy are the ones used
# (none of them is in the folder). WHEELS (default gpu_wheels) names the wheel folder.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
DRY=0
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
PYTHON=${PYTHON:-python3}
TARGET=${TARGET:-/tmp/gpu_check_site}
WHEELS=${WHEELS:-gpu_wheels}
RESULTS=${OUT:-outputs/gpu_check}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
SUMMARY=$RESULTS/summary.md
LOG=$RESULTS/log.txt
: > "$LOG"
T0=$(date +%s)
say() { echo "$*" | tee -a "$SUMMARY"; }
: > "$SUMMARY"

# -- install --------------------------------------------------------------------------------------
if [ ! -d "$WHEELS" ]; then
  echo "error: no wheel folder $WHEELS (build it with scripts/build_gpu_wheels.sh)" >&2
  exit 2
fi
PY=$PYTHON
rm -rf "$TARGET"
"$PY" -m pip install --quiet --no-index --no-deps --target "$TARGET" "$WHEELS"/*.whl >>"$LOG" 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled PYTHONPATH=$ROOT:$TARGET
"$PY" - <<'P' | tee -a "$SUMMARY"
import torch, dictionary_learning.training, dictionary_learning.trainers.matryoshka_batch_top_k  # noqa: F401
import matryoshka_plugin
from matryoshka_plugin import kernels
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"# GPU check\n\ntorch {torch.__version__}, GPU {gpu}, triton importable: {kernels.triton_available()}, "
      f"matryoshka_plugin from {matryoshka_plugin.__file__}")
P
say "install: $(( $(date +%s) - T0 )) s"

# -- 1. kernel tests --------------------------------------------------------------------------
TESTS="tests/test_kernels_triton.py tests/test_kernels.py tests/test_prefix_loss.py tests/test_sparse_encoder.py"
if "$PY" -m pytest -q -p no:cacheprovider $TESTS >"$RESULTS/tests.txt" 2>&1; then status=passed; else status=FAILED; fi
say "kernel tests: $status ($(tail -1 "$RESULTS/tests.txt"))"

# -- 2. speed ---------------------------------------------------------------------------------
if [ $DRY = 1 ]; then
  SPEED_ARGS="--device cpu --d 64 --dict-size 1024 --batch 256 --steps 2 --warmup 1"; KS="8 12"
else
  SPEED_ARGS="--device cuda --d 2304 --dict-size 65536 --batch 4096 --steps 10 --warmup 3"; KS="64 80"
fi
CANDS="matmul ours_groups ours_every upstream_matryoshka"
if "$PY" -c "import sae_lens.saes.matryoshka_batchtopk_sae" 2>/dev/null; then CANDS="$CANDS saelens_matryoshka"; fi
for K in $KS; do
  if "$PY" benchmarks/speed.py $SPEED_ARGS --k "$K" --only $CANDS --json "$RESULTS/speed_k$K.json" \
      >"$RESULTS/speed_k$K.txt" 2>&1; then
    "$PY" - "$RESULTS/speed_k$K.json" <<'P' | tee -a "$SUMMARY"
import json, sys
r = json.load(open(sys.argv[1]))
s, res = r["summary"], r["results"]
sh = s["shape"]
print(f"\nspeed d={sh['d']} F={sh['F']} k={sh['k']} B={sh['B']} {sh['device']}:")
print("| candidate | ms/step | tokens/s | peak MiB |\n|---|---|---|---|")
for n, v in res.items():
    print(f"| {n} | {1000 * v['min_s']:.2f} | {sh['B'] / v['min_s']:.0f} | {v['peak_mb']:.0f} |")
ours = res["ours_groups"]["min_s"]
for peer in ("upstream_matryoshka", "saelens_matryoshka"):
    if peer in res:
        print(f"{peer} / ours = {res[peer]['min_s'] / ours:.2f}x")
print(f"every / groups = {res['ours_every']['min_s'] / ours:.2f}x, groups / matmul = {ours / res['matmul']['min_s']:.2f}x")
P
  else
    say "speed k=$K: FAILED (see speed_k$K.txt)"; tail -5 "$RESULTS/speed_k$K.txt"
  fi
done
[ "${CANDS#*saelens}" = "$CANDS" ] && say "(SAELens' training SAE does not import here: not timed)"

# -- 3. trainSAE in bf16 ----------------------------------------------------------------------
if [ $DRY = 1 ]; then
  TRAIN_ARGS="--device cpu --d 32 --dict-size 256 --k 4 --batch 256 --steps 30"
else
  TRAIN_ARGS="--device cuda --d 2304 --dict-size 16384 --k 64 --batch 4096 --steps 300"
fi
for DT in bfloat16 float32; do
  if "$PY" scripts/gpu_check_train.py $TRAIN_ARGS --dtype $DT >"$RESULTS/train_$DT.txt" 2>&1; then
    say "trainSAE $DT: $(tail -1 "$RESULTS/train_$DT.txt")"
  else
    say "trainSAE $DT: FAILED (see train_$DT.txt)"; tail -5 "$RESULTS/train_$DT.txt"
  fi
done
say "total: $(( $(date +%s) - T0 )) s"
