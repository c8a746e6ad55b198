#!/usr/bin/env bash
# The CUDA path, proven and measured on one GPU (issue #13; about 5-8 minutes on one H200, no network,
# no pretrained weights). First the issue's headline: DeiT-B distilled freeze=last_block, bf16, the
# frozen-prefix cache, 10 epochs on 50,000 synthetic CIFAR-sized images (--big-images N), and the same
# model fully fine-tuned for 1 epoch; then deit_tiny and efficientnet_lite0 at 224 px and the scratch
# CNN at 32 px on 10,000 images (--images N / --data CIFAR10_ROOT): tensor vs loader data path, fp32 vs
# bf16, channels_last, torch.compile on/off; 3 epochs each. Prints a Markdown table (img/s per epoch,
# whole-run wall time, prefix pass, time waiting for data, peak GPU memory, GPU utilization from
# nvidia-smi) and writes everything under $OUT (or a temporary folder).
#
#   bash scripts/bench_gpu.sh                 # on the GPU machine
#   bash scripts/bench_gpu.sh --dry-run       # the same cases shrunk to seconds on CPU (tests/test_bench.py)
#   bash scripts/bench_gpu.sh --only deit     # a subset; --epochs N, --images N, --data ROOT
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
mode=--gpu
args=()
for a in "$@"; do
    if [ "$a" = "--dry-run" ]; then mode=--dry-run; else args+=("$a"); fi
done
exec "$PY" scripts/bench_speed.py "$mode" ${args[@]+"${args[@]}"}
