#!/usr/bin/env bash
# `tlbench plan` of every shipped model config (conf/model/*.yaml), offline, timed as a user runs
# it (a fresh process each: imports, config, model, freeze plan). Two columns: with
# model.pretrained=false and as configured (pretrained weights: the plan only looks whether they
# are cached). Prints a Markdown table; a plan over 10 s is flagged. The data is not needed: the
# default dataset is the embedded digits, and the last rows plan CIFAR-10 and EMNIST with no
# files on disk.
#
#   bash scripts/bench_plan.sh            # TLBENCH="python -m tlbench" to time another install
set -euo pipefail
cd "$(dirname "$0")/.."
TLBENCH=${TLBENCH:-.venv/bin/tlbench}
LIMIT=${LIMIT:-10}
export HF_HUB_OFFLINE=1 TLBENCH_OFFLINE=1
declare -A ARCH=([torchvision]=model.arch=resnet34 [timm]=model.arch=convnext_tiny)

seconds() {  # seconds COMMAND... -> elapsed wall time; the command's exit code must be 0
    local t0 t1
    t0=$(date +%s.%N)
    if ! $TLBENCH plan "$@" > /dev/null 2> /tmp/bench_plan.err; then
        echo "FAILED: tlbench plan $*" >&2; cat /tmp/bench_plan.err >&2; echo "failed"; return
    fi
    t1=$(date +%s.%N)
    awk -v a="$t0" -v b="$t1" -v lim="$LIMIT" 'BEGIN { d = b - a; printf "%.1f%s", d, (d > lim ? " (over " lim " s)" : "") }'
}

echo "| model | plan, pretrained=false (s) | plan as configured (s) |"
echo "|---|---|---|"
for f in conf/model/*.yaml; do
    m=$(basename "$f" .yaml)
    extra=(${ARCH[$m]:-})
    if grep -q '^pretrained: true' "$f"; then
        configured=$(seconds "model=$m" "${extra[@]}")
    else
        configured="(same)"
    fi
    echo "| $m${extra:+ ${extra[*]}} | $(seconds "model=$m" "${extra[@]}" model.pretrained=false) | $configured |"
done
nothing=$(mktemp -d)/nothing
echo "| resnet18, dataset=cifar10 (no files) | $(seconds model=resnet18 model.pretrained=false dataset=cifar10 "dataset.root=$nothing") | $(seconds model=resnet18 dataset=cifar10 "dataset.root=$nothing") |"
echo "| deit_tiny, dataset=emnist (no files) | $(seconds model=deit_tiny model.pretrained=false dataset=emnist "dataset.root=$nothing") | $(seconds model=deit_tiny dataset=emnist "dataset.root=$nothing") |"
