"""Benchmark of the frozen-prefix cache (issue #12), side by side in one invocation.

    .venv/bin/python scripts/bench_prefix_cache.py [--data ../shared/data/cifar10] [--per-class 50]
        [--epochs 3] [--threads 2] [--out outputs/bench_prefix_cache]

1. deit_tiny (random init) freeze=last_block, 224 px, batch 32: cache on vs off (epoch times,
   total time, the one-off prefix pass, test accuracy).
2. A 3-job lr sweep of the same: one shared feature store vs a fresh store per job.
3. EfficientNet-Lite0 with its real ImageNet weights, freeze=last_block: cache on vs off, with
   test accuracy and the trainable-parameter count.
4. tlbench (cache off) vs a minimal hand-written PyTorch loop on the same model, data, batch
   size and threads: the per-epoch training time ratio.

Prints a Markdown table (paste it into docs/benchmarks.md with the machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tlbench(out: Path, *overrides: str, cache_dir: Path) -> dict:
    env = {**os.environ, "TLBENCH_CACHE": str(cache_dir), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "tlbench", *overrides, f"hydra.run.dir={out}", "trainer.progress=false"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    res = json.loads((out / "results.json").read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def row(name: str, r: dict) -> str:
    t = r["time"]
    fc = r.get("feature_cache") or {}
    epochs = [e["train_seconds"] for e in r["epochs"]]
    return (f"| {name} | {fc.get('applied', False)} | {fc.get('split_block') or '-'} | "
            f"{(fc.get('compute_s') or 0):.1f} | {sum(epochs) / len(epochs):.2f} | {t['total_s']:.1f} | "
            f"{r['test']['label']['accuracy']:.4f} | {r['params']['trainable']:,} |")


def hand_loop(args, model_name: str) -> float:
    """Seconds per training epoch of a minimal loop: same tlbench-built model, data and batch."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from tlbench.build import build_everything, seed_everything
    from tlbench.compose import compose

    cfg = compose([f"model={model_name}", "model.pretrained=false", "freeze=last_block", "dataset=cifar10", f"dataset.root={args.data}",
                   f"dataset.limit_per_class={args.per_class}", "trainer.batch_size=32",
                   f"trainer.num_threads={args.threads}"])
    torch.set_num_threads(args.threads)
    seed_everything(0)
    bundle, model, plan = build_everything(cfg)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=32, shuffle=True)
    times = []
    for _ in range(2):
        model.train()
        t0 = time.perf_counter()
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x)["label"], y["label"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "outputs" / "bench_prefix_cache"))
    ap.add_argument("--skip", default="", help="comma list of parts to skip: deit,sweep,lite0,loop")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    skip = set(args.skip.split(","))
    common = ["dataset=cifar10", f"dataset.root={args.data}", f"dataset.limit_per_class={args.per_class}",
              "freeze=last_block", "trainer.batch_size=32", f"trainer.max_epochs={args.epochs}",
              f"trainer.num_threads={args.threads}", "trainer.device=cpu", "seed=0"]
    print("| run | cache | split block | prefix pass s | train s/epoch | total s | test acc | trainable |")
    print("|---|---|---|--:|--:|--:|--:|--:|")
    if "deit" not in skip:
        r = {c: tlbench(out / f"deit_{c}", "model=deit_tiny", "model.pretrained=false", *common,
                        f"trainer.cache_features={c}", cache_dir=out / f"cache_deit_{c}") for c in ("true", "false")}
        for c in ("true", "false"):
            print(row(f"deit_tiny last_block, cache {c}", r[c]))
        on, off = r["true"], r["false"]
        ep_on = sum(e["train_seconds"] for e in on["epochs"]) / len(on["epochs"])
        ep_off = sum(e["train_seconds"] for e in off["epochs"]) / len(off["epochs"])
        print(f"\ndeit_tiny: {ep_off / ep_on:.1f}x faster per training epoch; whole run {off['time']['total_s']:.1f} s "
              f"-> {on['time']['total_s']:.1f} s; test accuracy {off['test']['label']['accuracy']:.4f} vs "
              f"{on['test']['label']['accuracy']:.4f}\n")
    if "sweep" not in skip:
        shared, fresh = 0.0, 0.0
        for i, lr in enumerate(("1e-3", "3e-4", "1e-4")):
            a = tlbench(out / f"sweep_shared_{i}", "model=deit_tiny", "model.pretrained=false", *common,
                        f"optim.lr={lr}", cache_dir=out / "cache_sweep_shared")
            b = tlbench(out / f"sweep_fresh_{i}", "model=deit_tiny", "model.pretrained=false", *common,
                        f"optim.lr={lr}", cache_dir=out / f"cache_sweep_fresh_{i}")
            shared += a["wall_s"]
            fresh += b["wall_s"]
            print(f"sweep job lr={lr}: shared store {a['wall_s']:.1f} s (reused: {a['feature_cache']['reused']}), "
                  f"fresh store {b['wall_s']:.1f} s")
        print(f"3-job sweep wall time: shared store {shared:.1f} s, a store per job {fresh:.1f} s\n")
    if "lite0" not in skip:
        r = {c: tlbench(out / f"lite0_{c}", "model=efficientnet_lite0", "model.pretrained=true", *common,
                        f"trainer.cache_features={c}", cache_dir=out / f"cache_lite0_{c}") for c in ("true", "false")}
        for c in ("true", "false"):
            print(row(f"efficientnet_lite0 (ImageNet) last_block, cache {c}", r[c]))
        print()
    if "loop" not in skip:
        r = tlbench(out / "loop_tlbench", "model=deit_tiny", "model.pretrained=false", *common,
                    "trainer.cache_features=false", "trainer.max_epochs=2", cache_dir=out / "cache_loop")
        ours = min(e["train_seconds"] for e in r["epochs"])
        theirs = hand_loop(args, "deit_tiny")
        print(f"training epoch, cache off: tlbench {ours:.2f} s vs a minimal hand-written loop {theirs:.2f} s "
              f"(ratio {ours / theirs:.3f})")


if __name__ == "__main__":
    main()
