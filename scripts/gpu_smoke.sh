#!/usr/bin/env bash
# The first thing to run on a GPU machine (issue #13): does the CUDA path work at all? A few short
# runs on the embedded digits (no network, no weights), each checked from its
# results.json: the default run on cuda (tensor path on the device, bf16 auto), torch.compile,
# channels_last + bf16 on a conv net, the frozen-prefix cache, and a 1-process torchrun (the launcher
# path; nccl itself needs 2 GPUs: N=2 DEVICE=cuda bash scripts/bench_ddp.sh).
# ~2 minutes on one H200. Then: OUT=... bash scripts/bench_gpu.sh for the numbers.
#
#   OUT=/tmp/gpu_smoke bash scripts/gpu_smoke.sh          # on the GPU machine
#   DEVICE=cpu bash scripts/gpu_smoke.sh                  # the same runs on CPU (~40 s on 2 cores)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-$(mktemp -d /tmp/gpu_smoke.XXXX)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TLBENCH_CACHE="$OUT/cache"
BASE=(trainer.device="$DEVICE" trainer.progress=false model.pretrained=false)
fail=0

run() {  # run NAME MIN_ACC EXPECT_JSON -- overrides...: one tlbench run, then checks on its results.json
    local name=$1 min=$2 expect=$3; shift 4
    local t0=$SECONDS
    "$PY" -m tlbench "${BASE[@]}" "$@" hydra.run.dir="$OUT/$name" > "$OUT/$name.log" 2>&1
    local code=$?
    if ! "$PY" - "$OUT/$name" "$min" "$expect" "$code" "$((SECONDS - t0))" <<'PY'; then fail=1; fi
import json, sys
from pathlib import Path
rd, min_acc, expect, code, secs = Path(sys.argv[1]), float(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if code != 0 or not (rd / "results.json").is_file():
    print(f"FAIL {rd.name}: exit {code}; the log: {rd}.log"); sys.exit(1)
r = json.loads((rd / "results.json").read_text())
acc = r["test"][next(iter(r["test"]))]["accuracy"]
got = {k: (r.get("speed") or {}).get(k, (r.get("feature_cache") or {}).get(k)) for k in expect}
bad = {k: (got[k], v) for k, v in expect.items() if got[k] != v}
ok = acc >= min_acc and not bad
print(f"{'ok  ' if ok else 'FAIL'} {rd.name}: test accuracy {acc:.4f} (>= {min_acc}), {secs} s, "
      f"device {r.get('device')}, speed {json.dumps({k: got[k] for k in expect})}" + (f"; expected {bad}" if bad else ""))
sys.exit(0 if ok else 1)
PY
}

cuda=$([ "$DEVICE" = cuda ] && echo true || echo false)
bf16=$([ "$DEVICE" = cuda ] && echo '"bf16-mixed"' || echo '"32"')
run default 0.9 "{\"precision\": $bf16}" -- trainer.precision=auto trainer.max_epochs=5
run compile 0.9 "{\"compile\": true, \"compile_error\": null}" -- trainer.compile=true trainer.max_epochs=5
run cnn_channels_last 0.9 "{\"channels_last\": true}" -- model=cnn trainer.channels_last=true trainer.precision=auto \
    trainer.max_epochs=5
run prefix_cache 0.5 "{\"applied\": true}" -- model=cnn freeze=last_block trainer.cache_features=true trainer.max_epochs=5
t0=$SECONDS
"$PY" -m torch.distributed.run --standalone --nproc_per_node=1 -m tlbench "${BASE[@]}" trainer.max_epochs=3 \
    hydra.run.dir="$OUT/torchrun" > "$OUT/torchrun.log" 2>&1 \
    && "$PY" -c "import json,sys; r=json.load(open('$OUT/torchrun/results.json')); p=r['processes']; \
print('ok   torchrun: backend', p['backend'], 'devices', p['devices'], 'test accuracy', r['test']['label']['accuracy'], '$((SECONDS - t0)) s')" \
    || { echo "FAIL torchrun: see $OUT/torchrun.log"; fail=1; }
echo "gpu_smoke on $DEVICE: $([ $fail = 0 ] && echo 'all passed' || echo 'FAILURES above'); runs and logs in $OUT"
exit $fail
