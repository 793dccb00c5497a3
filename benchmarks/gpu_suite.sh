#!/usr/bin/env bash
# Every GPU measurement in one call, at most ~8 minutes on one GPU (so it can run twice in a short GPU window):
#   1. benchmarks/gpu.py: embeddings/s, the automatic generator vs Meta's, retraining throughput and memory,
#      for SAM ViT-B and ViT-H (random weights) and agreement on a trained compact model when one is given;
#   2. benchmarks/ml_backend.py on the GPU: a click through our ML backend with a ViT-H model (bf16).
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR] [TRAINED_PTH]
# Wheels the machine lacks (pycocotools, segment-anything) are installed from ./.whl when that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-benchmarks/.cache/gpu}}
trained=${2:-}
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
args=(--models vit_h,vit_b --images 2 --size 1500 --budget-s 230 --compile --skip-train vit_b --partial "$out/partial.json")
[ -n "$trained" ] && args+=(--trained "$trained")
timeout 250 python3 benchmarks/gpu.py "${args[@]}" 2>&1 | tee "$out/gpu.log"
timeout 45 python3 benchmarks/ml_backend.py --device cuda --preset sam-vit-h --precision bf16 --clicks 20 \
  2>&1 | tee "$out/ml_backend.log"
tail -n 1 "$out/gpu.log" > "$out/gpu.json"
tail -n 1 "$out/ml_backend.log" > "$out/ml_backend.json"
