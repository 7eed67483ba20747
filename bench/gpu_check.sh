#!/usr/bin/env bash
# The one prepared script for a lent GPU (H200; torch 2.11 + Triton 3.6; no network), under 8 minutes:
#   1. the kernel tests (python -m pytest tests/kernels -q -x), natively: PEFTFX_KERNELS=triton,
#      TRITON_INTERPRET=0, CI hypothesis profile; time limits 200 s + 100 s;
#   2. fused NF4+LoRA forward and forward+backward vs bf16 F.linear + LoRA and vs dequantize-then-matmul,
#      M in (1, 16, 4096), K = N = 4096, r = 16 (bench/gpu_kernels.py, limit 170 s), table ->
#      $OUT/gpu_results.md. Worst case about 8 minutes including startup;
#   3. generation tokens/s vs transformers bf16 generate (bench/generation.py --device cuda, limit 150 s).
# Usage: bash bench/gpu_check.sh      (from anywhere; OUT optional)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-python3}
export TRITON_INTERPRET=0 PEFTFX_KERNELS=triton CI=1 PYTHONUNBUFFERED=1
# Property tests hit many constexpr specializations: one config each instead of a 10-config autotune.
export PEFTFX_TRITON_AUTOTUNE=0

# The machine has its own torch/triton and no network: import peftfx from the working tree through a
# shim package dir (pyproject maps peftfx -> rewriter/, peftfx.kernels -> kernels/, peftfx.passes -> passes/).
if ! "$PY" -c "import peftfx.kernels.qlora_triton" 2>/dev/null; then
  SHIM=$(mktemp -d)/shim
  mkdir -p "$SHIM/peftfx"
  for f in "$ROOT"/rewriter/*; do ln -s "$f" "$SHIM/peftfx/$(basename "$f")"; done
  ln -s "$ROOT/kernels" "$SHIM/peftfx/kernels"
  ln -s "$ROOT/passes" "$SHIM/peftfx/passes"
  export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' || { echo "missing torch/triton/pytest/hypothesis on this machine"; exit 2; }
import torch, triton, pytest, hypothesis
print(f"torch {torch.__version__}, triton {triton.__version__}, cuda {torch.cuda.is_available()}",
      torch.cuda.get_device_name() if torch.cuda.is_available() else "")
PYEOF

RESULTS=${OUT:+$OUT/gpu_results.md}
status=0
run_tests() {  # label, timeout, pytest args...
  local label=$1 limit=$2; shift 2
  echo "== $label =="
  timeout "$limit" "$PY" -m pytest -q -x -p no:cacheprovider "$@" 2>&1 | tail -30
  local rc=${PIPESTATUS[0]}
  echo "$label: pytest exit code $rc"
  [ -n "$RESULTS" ] && echo "- $label (native Triton, PEFTFX_KERNELS=triton): pytest exit code $rc" >> "$RESULTS"
  [ "$rc" -ne 0 ] && status=1
}
# The Triton kernel tests first, so a failure elsewhere in tests/kernels cannot hide them under -x;
# then the rest of tests/kernels (ops, reference, modules) with the Triton backend forced.
run_tests "1a/2 Triton kernel tests" 200 tests/kernels/test_quant_triton.py tests/kernels/test_qlora_triton.py
run_tests "1b/2 other kernel tests" 100 tests/kernels \
  --ignore=tests/kernels/test_quant_triton.py --ignore=tests/kernels/test_qlora_triton.py

echo "== 2/2 fused NF4+LoRA benchmark =="
unset PEFTFX_TRITON_AUTOTUNE  # the benchmark autotunes the Hopper configs
timeout 170 "$PY" bench/gpu_kernels.py
rc=$?
echo "benchmark exit code: $rc"
[ "$rc" -ne 0 ] && status=1

# Generation (issue 15): peftfx.generate NF4+LoRA (bf16 compute) tokens/s vs transformers bf16 dense generate,
# bench Llama (hidden 1024, 4 layers), prompt 128 -> 128 new tokens, batch 1 and 8. Needs transformers.
echo "== 3/3 generation tokens/s =="
if "$PY" -c "import transformers" 2>/dev/null; then
  timeout 150 "$PY" -m bench.generation --device cuda --reps 3 --out "${RESULTS:-/dev/null}"
  rc=$?
  echo "generation benchmark exit code: $rc"
  [ "$rc" -ne 0 ] && status=1
else
  echo "generation benchmark skipped: transformers is not installed on this machine"
fi
exit $status
