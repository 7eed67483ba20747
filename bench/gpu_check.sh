#!/usr/bin/env bash
# The one prepared script for a lent GPU (H200; torch 2.11 + Triton 3.6; no network), under 8 minutes:
#   (default, about 7.5 minutes including startup)
#   1. the kernel tests, natively: PEFTFX_KERNELS=triton, TRITON_INTERPRET=0, CI hypothesis profile:
#      1a the Triton kernel tests (inline-PTX decode, quantize, fused tiles, GEMV) 230 s; 1b the rest of
#      tests/kernels with the Triton backend forced, 60 s;
#   2. fused NF4+LoRA forward and forward+backward vs bf16 F.linear + LoRA (cuBLAS), vs
#      dequantize-then-matmul and vs bitsandbytes (if importable), M in (1, 16, 256, 4096),
#      K = N = 4096, r = 16 (python -m bench.gpu_kernels, limit 150 s): writes the table and the chosen
#      configs into bench/RESULTS.md (section gpu_kernels) and $OUT/gpu_results.md, plot
#      bench/gpu_kernels.png (+ $OUT).
# Each other block is its own run (one run stays under the 8-minute device limit):
#   bash bench/gpu_check.sh memory   activation memory (bench/activation_memory.py --device cuda, limit 240 s):
#      peftfx off / blocks / selective / blocks+offload vs peft+bnb gradient checkpointing
#      -> $OUT/activation_memory.md + .png.
#   bash bench/gpu_check.sh generation   peftfx.generate NF4+LoRA (bf16 compute) tokens/s vs transformers bf16
#      generate, bench Llama, prompt 128 -> 128 new tokens, batch 1 and 8 (limit 150 s).
# Not yet run on a GPU (written on a machine without one; AOT-compiled for sm_80/sm_90 only).
# Usage: bash bench/gpu_check.sh      (from anywhere; OUT optional)
#        bash bench/gpu_check.sh optim   the separate peftfx.optim block only (issue 16, about 4 minutes):
#   the Triton 8-bit AdamW kernel tests and the paged-optimizer CUDA tests natively (limit 150 s), then
#   bench/optim.py --device cuda (torch AdamW, bitsandbytes and torchao AdamW8bit, peftfx AdamW8bit and the
#   paged variants: step time, state bytes, peak GPU memory; limit 200 s) -> $OUT/gpu_optim.md.
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
if [ "${1:-}" = "optim" ]; then  # ---- peftfx.optim block (issue 16) ----
  run_tests "optim 1/2 Triton 8-bit AdamW + paged optimizers" 150 \
    tests/optim/test_triton_step.py tests/optim/test_paged_cuda.py
  echo "== optim 2/2 optimizer step benchmark (GPU rows) =="
  timeout 200 "$PY" -m bench.optim --device cuda --sizes 50 200 --reps 5 --out "${OUT:-/tmp}/gpu_optim.md"
  rc=$?
  echo "optim benchmark exit code: $rc"
  [ "$rc" -ne 0 ] && status=1
  exit $status
fi

if [ "${1:-}" = "memory" ]; then  # ---- activation memory block (issue 13) ----
  echo "== activation memory: [memory] checkpointing vs peft+bnb gradient checkpointing (CUDA) =="
  # bench Llama, seq 512..2048, fp32 compute on both sides; blocks+offload joins on CUDA (pinned host
  # memory on a side stream); peaks from torch.cuda.max_memory_allocated. Targets: blocks peak <= 0.8x and
  # step <= 1.0x peft+bnb with gradient_checkpointing_enable(use_reentrant=False); blocks+offload < blocks.
  timeout 240 "$PY" -m bench.activation_memory --device cuda --seqs 512,1024,2048 --reps 3 \
    --out "${OUT:-/tmp}/activation_memory.md" --plot "${OUT:-/tmp}/activation_memory.png"
  rc=$?
  echo "activation memory benchmark exit code: $rc"
  [ "$rc" -ne 0 ] && status=1
  exit $status
fi

if [ "${1:-}" = "generation" ]; then  # ---- generation block (issue 15) ----
  # Generation (issue 15): peftfx.generate NF4+LoRA (bf16 compute) tokens/s vs transformers bf16 dense generate,
  # bench Llama (hidden 1024, 4 layers), prompt 128 -> 128 new tokens, batch 1 and 8. Needs transformers.
  echo "== generation tokens/s =="
  if "$PY" -c "import transformers" 2>/dev/null; then
    timeout 150 "$PY" -m bench.generation --device cuda --reps 3 --out "${RESULTS:-/dev/null}"
    rc=$?
    echo "generation benchmark exit code: $rc"
    [ "$rc" -ne 0 ] && status=1
  else
    echo "generation benchmark skipped: transformers is not installed on this machine"
  fi
  exit $status
fi

# The Triton kernel tests first, so a failure elsewhere in tests/kernels cannot hide them under -x;
# then the rest of tests/kernels (ops, reference, modules) with the Triton backend forced.
TRITON_TESTS="tests/kernels/test_decode_asm_triton.py tests/kernels/test_quant_triton.py tests/kernels/test_qlora_triton.py tests/kernels/test_gemv_triton.py"
# shellcheck disable=SC2086
run_tests "1a/2 Triton kernel tests" 230 $TRITON_TESTS
# the AOT test compiles for sm_80/sm_90 on the CPU: it ran where the code was written, not needed here
run_tests "1b/2 other kernel tests" 60 tests/kernels --ignore=tests/kernels/test_aot_resources.py \
  $(for t in $TRITON_TESTS; do printf -- "--ignore=%s " "$t"; done)

echo "== 2/2 fused NF4+LoRA benchmark =="
unset PEFTFX_TRITON_AUTOTUNE  # the benchmark autotunes (<= 3 pruned configs per key)
timeout 150 "$PY" -m bench.gpu_kernels
rc=$?
echo "benchmark exit code: $rc"
[ "$rc" -ne 0 ] && status=1

exit $status
