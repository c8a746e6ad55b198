#!/usr/bin/env bash
# One run on 1 process vs the same run on N processes (DDP: torchrun, gloo on CPU, nccl on
# CUDA), side by side in one invocation: training images/s per epoch (mean over epochs 2..E, the
# first one warms up) read back from each run's results.json. Default: the from-scratch CNN on
# the embedded digits at 32 px, CPU. The world-size-1 run uses all N threads, each of the N
# processes one, so both use the same cores.
#
#   bash scripts/bench_ddp.sh                      # N=2 EPOCHS=4 on CPU
#   N=4 DEVICE=cuda bash scripts/bench_ddp.sh model=deit_tiny freeze=full   # on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
N=${N:-2}
EPOCHS=${EPOCHS:-4}
DEVICE=${DEVICE:-cpu}
export OUT=${OUT:-$(mktemp -d /tmp/bench_ddp.XXXX)}
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(model=cnn model.image_size=32 "model.channels=[32,64,128]")
COMMON=("${ARGS[@]}" trainer.max_epochs="$EPOCHS" trainer.device="$DEVICE" trainer.progress=false
        trainer.cache_features=false trainer.batch_size=64)
export HF_HUB_OFFLINE=1

ips() {  # ips RUN_DIR -> training images/s (epochs 2..E)
    "$PY" - "$1" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/results.json"))
e = r["epochs"][1:] or r["epochs"]
print(f'{sum(x["train"]["n"] for x in e) / sum(x["train_seconds"] for x in e):.0f} '
      f'{r["test"][next(iter(r["test"]))]["accuracy"]:.4f}')
PY
}

threads=$([ "$DEVICE" = cpu ] && echo "trainer.num_threads=$N" || echo "")
"$PY" -m tlbench "${COMMON[@]}" $threads hydra.run.dir="$OUT/1" > "$OUT/1.log" 2>&1
read -r one acc1 < <(ips "$OUT/1")
"$PY" -m torch.distributed.run --standalone --nproc_per_node="$N" -m tlbench "${COMMON[@]}" \
    $([ "$DEVICE" = cpu ] && echo "trainer.num_threads=1") hydra.run.dir="$OUT/$N" > "$OUT/$N.log" 2>&1
read -r many accn < <(ips "$OUT/$N")
echo "| processes | device | train img/s | test accuracy |"
echo "|---|---|---|---|"
echo "| 1 | $DEVICE | $one | $acc1 |"
echo "| $N | $DEVICE | $many | $accn |"
awk -v a="$one" -v b="$many" -v n="$N" 'BEGIN { printf "speed-up x%.2f with %d processes (runs in %s)\n", b / a, n, ENVIRON["OUT"] }'
