#!/usr/bin/env bash
# The GPU checks in one device call (a few minutes on an H100): the CUDA tests, then the step
# benchmarks (b) block attention, (c) MLP, (c) at 400 subnetworks and (d) a ResNet, at float32 and
# TF32, with the bfloat16 Gram beside each. Results under $OUT (default runs/gpu). The lent machine
# has PyTorch but not pydantic: carry its wheels (docs/performance.md, "Not done"):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.txt"
python3 benchmarks/bench_step.py --device cuda --settings b,c,c400,d \
    --methods fast,fast-bf16,floor --scaling-methods fast,fast-bf16,floor \
    --matmul-precision highest,high --repeats 20 --json "$OUT/bench_step.json" 2>&1 |
    tee "$OUT/bench_step.txt"
