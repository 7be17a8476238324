#!/usr/bin/env bash
# The GPU measurements in one command, on one GPU (random-init ViT-B/16: weights do not change speed):
#   bash infra/benchmark-gpu.sh [output dir, default out/bench-gpu]
# teacher bf16 at 1024 x 2048, stride 24 (windows/s, s/image, MFU against the bf16 GEMM ceiling,
# attention kernel), the same compiled, TF32, the single pass vs the sliding window, training
# steps/s with the loader and its data-wait share at the paper's resolution, and the loader per core.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/bench-gpu}
py=${PYTHON:-python}
mkdir -p "$out"
run() { local name=$1; shift; echo "+ benchmark.py $*" >&2; "$py" jobs/benchmark.py "$@" out="$out/$name.json"; }
run teacher-bf16 teacher height=1024 width=2048 stride=24 dtype=bfloat16 repeats=3
run teacher-bf16-compiled teacher height=1024 width=2048 stride=24 dtype=bfloat16 compile=true repeats=3
run teacher-tf32 teacher height=1024 width=2048 stride=24 dtype=tf32 repeats=2
run speedup-bf16 speedup height=1024 width=2048 stride=24 dtype=bfloat16 repeats=3
run train-1024x2048 train source_size=[1024,2048] scale=[2048,1024] min_side=512 images=16 views=1 epochs=2 \
    warmup_steps=4 cpus="$(nproc)" loader_workers="$(( $(nproc) - 2 ))" zero_stages=[0]
run loader loader cpus="$(nproc)"
echo "results in $out/" >&2
