#!/usr/bin/env bash
# Measured table of docs/datasets.md: one from-scratch CNN run per dataset (and per
# handwritten_digits task) on the small real subsets in ../shared/data, on the CPU.
# Each run dir is then verified by the outside checker ../shared/tools/check_run.py.
#
#   scripts/bench_datasets.sh [NAME ...]     NAME: cifar10 emnist digits language multitask chest_xray
#
# Environment: DATA (default ../shared/data), OUT (default outputs/bench_datasets),
# TLBENCH (default .venv/bin/tlbench), PY (default .venv/bin/python), CHECK (check_run.py).
# Takes ~7.5 minutes of CPU time on 2 cores (longer wall time on a busy machine).
# The numbers are small subsets + a scratch CNN: NOT comparable with published results.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-$(cd .. && pwd)/shared/data}
OUT=${OUT:-outputs/bench_datasets}
TLBENCH=${TLBENCH:-.venv/bin/tlbench}
PY=${PY:-.venv/bin/python}
CHECK=${CHECK:-$(cd .. && pwd)/shared/tools/check_run.py}
mkdir -p "$OUT"

# common to every run: scratch CNN (conv3x3 32 + pool, conv3x3 64 + pool, global average pool),
# Adam 1e-3, CPU, no progress bars
COMMON=(model=cnn "model.channels=[32,64]" optim=adam optim.lr=1e-3 sched=none
        trainer.device=cpu trainer.batch_size=64 trainer.progress=false seed=0)

run() {  # run NAME CHECK_ARGS -- OVERRIDES...
    local name=$1; shift
    local check=()
    while [[ $1 != -- ]]; do check+=("$1"); shift; done; shift
    rm -rf "${OUT:?}/$name"
    echo "== $name: $TLBENCH $* ${COMMON[*]}"
    local t0=$SECONDS
    "$TLBENCH" "$@" "${COMMON[@]}" "hydra.run.dir=$OUT/$name"
    echo "$((SECONDS - t0))" > "$OUT/$name/wall_seconds"
    "$PY" "$CHECK" "$OUT/$name" "${check[@]}"
}

bench() {
    case $1 in
    cifar10)  # 5,000 train (4,500 train + 500 val) + 2,000 official test, 32x32 native
        run cifar10 -- dataset=cifar10 "dataset.root=$DATA/cifar10" trainer.max_epochs=8 ;;
    emnist)   # 8,178 train (7,360 + 818 val) + 2,350 test, 47 classes, 28x28 native
        run emnist -- dataset=emnist "dataset.root=$DATA/emnist" dataset.split=balanced trainer.max_epochs=4 ;;
    digits)   # 3,528 PNGs (English 28 px, Thai 300 px) resized to 32; 70/15/15 stratified split
        run hwd_digit --truth-root "$DATA/handwritten_digits" --layout lang_digit -- \
            dataset=handwritten_digits "dataset.root=$DATA/handwritten_digits" dataset.task=digit \
            model.image_size=32 trainer.max_epochs=6 ;;
    language)
        run hwd_language --truth-root "$DATA/handwritten_digits" --layout lang_digit -- \
            dataset=handwritten_digits "dataset.root=$DATA/handwritten_digits" dataset.task=language \
            model.image_size=32 trainer.max_epochs=3 ;;
    multitask)
        run hwd_multitask --truth-root "$DATA/handwritten_digits" --layout lang_digit -- \
            dataset=handwritten_digits "dataset.root=$DATA/handwritten_digits" dataset.task=multitask \
            model.image_size=32 trainer.max_epochs=6 ;;
    chest_xray)  # 186 train/ images (val carved from them) + 44 test/ images, 3 classes, resized to 64
        run chest_xray --truth-root "$DATA/chest_xray" --layout class -- \
            dataset=chest_xray "dataset.root=$DATA/chest_xray" model.image_size=64 trainer.max_epochs=15 ;;
    *) echo "unknown benchmark $1 (cifar10 emnist digits language multitask chest_xray)" >&2; exit 2 ;;
    esac
}

names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(cifar10 emnist digits language multitask chest_xray)
for n in "${names[@]}"; do bench "$n"; done

# the markdown table of docs/datasets.md, from the run dirs
"$PY" - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
print("\n| run | dataset | task | classes | train / val / test | epochs (best) | test accuracy | s/epoch (train+val) | total s (wall s) |")
print("|---|---|---|---|---|---|---|---|---|")
for name in ("cifar10", "emnist", "hwd_digit", "hwd_language", "hwd_multitask", "chest_xray"):
    path = out / name / "results.json"
    if not path.is_file():
        continue
    r = json.loads(path.read_text())
    splits = json.loads((out / name / "splits.json").read_text())
    sizes = " / ".join(f"{len(splits[s]):,}" for s in ("train", "val", "test"))
    t = r["time"]
    per_epoch = t["train_s_per_epoch"] + t["val_s_per_epoch"]
    wall = (out / name / "wall_seconds").read_text().strip() if (out / name / "wall_seconds").is_file() else "?"
    for task, m in r["test"].items():
        print(f"| {name} | {r['dataset']} | {task} | {len(r['tasks'][task])} | {sizes} | "
              f"{r['epochs_run']} ({r['best_epoch']}) | {m['accuracy']:.4f} | {per_epoch:.1f} | "
              f"{t['total_s']:.0f} ({wall}) |")
EOF
