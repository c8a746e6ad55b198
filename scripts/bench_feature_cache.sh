#!/usr/bin/env bash
# Side-by-side: a linear probe (frozen backbone) with the backbone's features computed once
# (trainer.cache_features=true; the default auto applies it wherever it can) vs run on every epoch (false). Same data, split,
# seed and epochs, one after the other in one invocation; prints both times and the ratio and
# checks that both runs reached the same test accuracy.
#
#   bash scripts/bench_feature_cache.sh [CIFAR10_ROOT] [EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$(cd .. && pwd)/shared/data/cifar10}
EPOCHS=${2:-5}
OUT=${OUT:-outputs/bench_feature_cache}
TLBENCH=${TLBENCH:-.venv/bin/tlbench}
export HF_HUB_OFFLINE=1
COMMON=(dataset=cifar10 "dataset.root=$DATA" dataset.limit_per_class=20 model=efficientnet_lite0
        model.pretrained=true model.image_size=128 freeze=linear_probe "trainer.max_epochs=$EPOCHS"
        trainer.device=cpu trainer.progress=false trainer.num_threads=1 seed=0)
rm -rf "$OUT"
for cache in true false; do
    "$TLBENCH" "${COMMON[@]}" "trainer.cache_features=$cache" "hydra.run.dir=$OUT/cache_$cache" > /dev/null
done
.venv/bin/python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r = {c: json.load(open(f"{out}/cache_{c}/results.json")) for c in ("true", "false")}
for c in ("true", "false"):
    t = r[c]["time"]
    print(f"cache_features={c:5s}: total {t['total_s']:6.1f} s, train {t['train_s_per_epoch']:.3f} s/epoch, "
          f"feature pass {t['feature_cache_s'] or 0:.1f} s, test accuracy {r[c]['test']['label']['accuracy']:.4f}")
print(f"speed-up of the whole run: {r['false']['time']['total_s'] / r['true']['time']['total_s']:.1f}x")
assert abs(r["true"]["test"]["label"]["accuracy"] - r["false"]["test"]["label"]["accuracy"]) <= 0.01
PY
