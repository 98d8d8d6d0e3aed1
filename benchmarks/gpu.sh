#!/usr/bin/env bash
# GPU figures (H100/H200 class, < 10 minutes): MAR-B bf16 training throughput and MFU, sampling images/s at
# batch 256, KL-16 caching throughput. Writes ${OUT:-outputs/bench}/gpu-<date>.json; commit the file as a dated
# result under benchmarks/results/ when it was run.
#   bash benchmarks/gpu.sh            # in an environment with lightning-ar installed
#   PEAK_TFLOPS=989 bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-outputs/bench}/gpu-$(date -u +%Y%m%d).json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/gpu_bench.py --out "$out" --peak-tflops "${PEAK_TFLOPS:-989}"
echo "wrote $out"
