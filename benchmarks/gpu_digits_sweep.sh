#!/usr/bin/env bash
# One device run: CUDA correctness check, then a sweep of digits configs at the CPU demo's step budgets.
# Usage on the GPU machine (repo root): bash benchmarks/gpu_digits_sweep.sh OUTDIR
set -uo pipefail
OUT=${1:-/tmp/sweep_out}
mkdir -p "$OUT"
[ -d .wheels ] && python3 -m pip install --quiet --no-deps --no-index .wheels/*.whl 2>&1 | tail -2
export PYTHONPATH=$PWD LIGHTNING_AR_CACHE=$OUT/cache PYTHONUNBUFFERED=1
nvidia-smi -L
python3 benchmarks/cuda_check.py > "$OUT/cuda_check.json" 2> "$OUT/cuda_check.err"; cat "$OUT/cuda_check.json"
python3 -c "from lightning_ar.metrics import load_or_train_digits_classifier as f; f()"  # cache once
run() { python3 benchmarks/digits_sweep.py "$@" 2>>"$OUT/sweep.err" | grep '^{' >> "$OUT/sweep.jsonl"; }
run --steps 1000 &
run --steps 1500 --set dropout=0.0 &
run --steps 1500 --set diffusion_batch_mul=2 &
run --steps 2000 --set dropout=0.0 --set diffusion_batch_mul=2 &
run --steps 640 --set dropout=0.0 --set width=192 --set head_width=192 --set encoder_depth=4 --set decoder_depth=4 &
run --steps 1600 --set dropout=0.0 --set width=96 --set head_width=96 &
wait
run --steps 1500 --set dropout=0.0 --lr 2e-3 &
run --steps 1500 --set dropout=0.0 --lr 5e-4 &
run --steps 3000 --set dropout=0.0 &
run --steps 1500 --set dropout=0.0 --precision bf16-mixed &
run --steps 1500 --set dropout=0.0 --ema 0.998 &
run --steps 3000 --set dropout=0.0 --batch-size 64 &
wait
wc -l "$OUT/sweep.jsonl"; tail -5 "$OUT/sweep.err"
