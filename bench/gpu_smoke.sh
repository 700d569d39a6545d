#!/usr/bin/env bash
# One script for the first GPU this project gets (one H100/H200, under 8 minutes): the gpu-marked tests, then the
# roofline shapes of bench/gpu_smoke.py (fused_experts T = 1/64/4096 for both Qwen3-MoE
# layers, paged decode B = 1 L = 4K/32K and B = 64 L = 4K, causal prefill attention at 8K), each printed with its
# fraction of the roofline. Stops at the first failure and says which step failed. Not run by CI (no GPU there);
# tests/test_gpu_smoke.py checks its syntax and imports its Python part.
#
#     bash bench/gpu_smoke.sh            # from the source tree, in the venv qwen_fast is installed in
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo; echo "=== gpu_smoke [$((SECONDS - start))s] $*"; }
fail() { echo; echo "=== gpu_smoke FAILED at: $1 (after $((SECONDS - start))s)" >&2; exit 1; }

step "environment"
python -P -c "import torch, triton, qwen_fast; assert torch.cuda.is_available(), 'no CUDA device';
print(torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__);
print('extension:', qwen_fast._native.LOAD_ERROR or 'loaded')" || fail "environment (no CUDA device, or qwen_fast not importable)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true

step "gpu-marked tests (at most 300 s)"
timeout 300 python -P -m pytest -q -x -m gpu tests || fail "gpu tests (exit $?; 124 = over 300 s)"

step "roofline shapes (at most 150 s)"
timeout 150 python -P bench/gpu_smoke.py || fail "roofline shapes (exit $?; 124 = over 150 s)"

step "done in $((SECONDS - start))s"
