"""Speed benchmark of the data paths and the CUDA switches (issue #13), side by side in one
invocation: each case is one ``tlbench`` run (in this process, one after the other); its numbers
come back from the run's results.json. Prints a Markdown table and writes everything under
``--out`` (default ``$OUT``, else a temporary folder): ``bench.md``, ``bench.json`` and one run
directory per case (checkpoints removed). The synthetic data and the feature store go to
``--work`` (default: a temporary folder, removed at the end), never under ``--out``: the headline
case stores ~30 GB of prefix outputs.

    python scripts/bench_speed.py --gpu       # scripts/bench_gpu.sh: the CUDA path (<= 5 min on one H200)
    python scripts/bench_speed.py --cpu       # make bench: tensor vs loader path on this CPU
    python scripts/bench_speed.py --dry-run   # the --gpu cases shrunk to seconds on CPU (tests/test_bench.py)

Data: ``--data DIR`` (a CIFAR-10 root, e.g. ../shared/data/cifar10), else a synthetic CIFAR-10
(official pickle layout, random class templates + noise) written under ``--out``. Weights are
never needed (``model.pretrained=false``): the numbers are speed, not accuracy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests")]

# (case, overrides); every case also gets COMMON, then the case's own overrides win (Hydra: the last value
# of a key). "{big}" stands for the 50,000-image data set (--big-images), made only when a case uses it.
HEADLINE = [  # issue #13's goal: the paper's 10-epoch DeiT-B last-block run in under a minute on one GPU
    ("deit_base_distilled last_block bf16 10ep 50k", [
        "model=deit_base_distilled", "freeze=last_block", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor",
        "trainer.cache_features=auto", "trainer.max_epochs=10", "dataset.root={big}",
        # the prefix outputs (197 tokens x 768 in float16 per image and per mirror: ~27 GB for the training
        # split) stay on the GPU (at the default budget, 4 GB, every batch would come from the host), and
        # in this process: one run shares them with no other job, so no disk store (a store would write
        # and sha256 them, ~30 GB, before the first epoch; `--only store` measures that case)
        "dataset.tensor_budget_gb=48", "trainer.feature_store=null"]),
    ("deit_base_distilled full bf16 1ep 50k", [
        "model=deit_base_distilled", "freeze=full", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor",
        "trainer.max_epochs=1", "dataset.root={big}"]),
]
ON_REQUEST = [  # run only when --only names them
    ("deit_base_distilled last_block bf16 10ep 50k store", [
        "model=deit_base_distilled", "freeze=last_block", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor",
        "trainer.cache_features=auto", "trainer.max_epochs=10", "dataset.root={big}", "dataset.tensor_budget_gb=48",
        "trainer.feature_store=auto"]),
]
GPU_CASES = HEADLINE + [
    ("deit_tiny bf16 tensor", ["model=deit_tiny", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor"]),
    ("deit_tiny bf16 loader", ["model=deit_tiny", "trainer.precision=bf16-mixed", "dataset.pipeline=loader"]),
    ("deit_tiny fp32 tensor", ["model=deit_tiny", "trainer.precision=32", "dataset.pipeline=tensor"]),
    ("deit_tiny bf16 tensor compile", ["model=deit_tiny", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor",
                                       "trainer.compile=true"]),
    ("efficientnet_lite0 bf16 tensor channels_last", ["model=efficientnet_lite0", "trainer.precision=bf16-mixed",
                                                      "dataset.pipeline=tensor", "trainer.channels_last=true"]),
    ("efficientnet_lite0 bf16 tensor contiguous", ["model=efficientnet_lite0", "trainer.precision=bf16-mixed",
                                                   "dataset.pipeline=tensor", "trainer.channels_last=false"]),
    ("efficientnet_lite0 bf16 tensor channels_last compile", [
        "model=efficientnet_lite0", "trainer.precision=bf16-mixed", "dataset.pipeline=tensor",
        "trainer.channels_last=true", "trainer.compile=true"]),
    ("cnn 32px tensor", ["model=cnn", "model.channels=[64,128,256]", "dataset.pipeline=tensor"]),
    ("cnn 32px loader", ["model=cnn", "model.channels=[64,128,256]", "dataset.pipeline=loader"]),
]
GPU_COMMON = ["trainer.device=cuda", "trainer.batch_size=256", "trainer.deterministic=false", "trainer.compile=false"]
CPU_CASES = [
    ("cnn 32px tensor", ["model=cnn", "dataset.pipeline=tensor"]),
    ("cnn 32px loader", ["model=cnn", "dataset.pipeline=loader"]),
    ("efficientnet_lite0 64px tensor", ["model=efficientnet_lite0", "model.image_size=64", "dataset.pipeline=tensor",
                                        "dataset.limit_per_class=30"]),
    ("efficientnet_lite0 64px loader", ["model=efficientnet_lite0", "model.image_size=64", "dataset.pipeline=loader",
                                        "dataset.limit_per_class=30"]),
]
CPU_COMMON = ["trainer.device=cpu", "trainer.batch_size=64"]
COMMON = ["dataset=cifar10", "dataset.augment=flip", "dataset.val_fraction=0.1", "freeze=full",
          "model.pretrained=false", "trainer.cache_features=false", "trainer.progress=false",
          "trainer.log_every_n_steps=null"]
DRY = ["model=cnn", "model.channels=[8]", "model.image_size=16", "trainer.compile=false", "trainer.batch_size=32"]


def synthetic_cifar(root: Path, per_batch: int, n_test: int, seed: int = 0) -> Path:
    """A CIFAR-10 in the official layout: per class a random template, each image template + noise."""
    from fixtures_data import CIFAR_NAMES, py2_pickle

    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, (10, 3072)).astype(np.int16)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for b, n in enumerate([per_batch] * 5 + [n_test]):
        labels = rng.integers(0, 10, n)
        data = np.clip(templates[labels] // 2 + rng.integers(0, 128, (n, 3072)), 0, 255).astype(np.uint8)
        name = "test_batch" if b == 5 else f"data_batch_{b + 1}"
        py2_pickle({"batch_label": name, "labels": labels.tolist(), "data": data,
                    "filenames": [f"{name}_{i}.png" for i in range(n)]}, folder / name)
    py2_pickle({"num_cases_per_batch": per_batch, "label_names": CIFAR_NAMES, "num_vis": 3072},
               folder / "batches.meta")
    return root


class GpuSampler:
    """``nvidia-smi`` utilization every 0.5 s on a thread (nothing where there is no nvidia-smi)."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        if shutil.which("nvidia-smi"):
            self.thread.start()

    def _run(self):
        while not self.stop.wait(0.5):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out and out[0].isdigit():
                self.samples.append((time.time(), float(out[0])))

    def mean(self, t0: float, t1: float):
        v = [u for t, u in self.samples if t0 <= t <= t1]
        return round(sum(v) / len(v)) if v else None


def run_case(name: str, overrides: list[str], out: Path) -> dict:
    """One tlbench run in this process; its speed numbers from results.json."""
    import torch

    from tlbench.cli import main

    rd = out / "runs" / name.replace(" ", "_")
    shutil.rmtree(rd, ignore_errors=True)
    if torch.cuda.is_available():  # the previous case's tensors gone, so the peak is this case's own
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()  # a compiled case pays its own compilation
    t0 = time.time()
    try:
        code = main([*overrides, f"hydra.run.dir={rd}"])
    except SystemExit as e:
        code = e.code
    t1 = time.time()
    shutil.rmtree(rd / "checkpoints", ignore_errors=True)
    if code != 0 or not (rd / "results.json").is_file():
        return {"case": name, "failed": f"exit {code}, see {rd}/train.log", "t0": t0, "t1": t1}
    r = json.loads((rd / "results.json").read_text())
    ep = r["epochs"]
    later = ep[1:] or ep
    s = r.get("speed", {})
    return {"case": name, "t0": t0, "t1": t1, "wall_s": t1 - t0,
            "pipeline": s.get("pipeline", {}).get("mode"), "precision": s.get("precision"),
            "channels_last": s.get("channels_last"), "compile": s.get("compile"),
            "optimizer": s.get("optimizer"),
            "train_ips_first": ep[0]["train"]["n"] / ep[0]["train_seconds"],
            "train_ips": sum(e["train"]["n"] for e in later) / sum(e["train_seconds"] for e in later),
            "eval_ips": sum(e["val"]["n"] for e in later) / sum(e["val_seconds"] for e in later),
            "epoch_s": sum(e["train_seconds"] + e["val_seconds"] for e in later) / len(later),
            "peak_gb": s.get("cuda_peak_memory_gb"),
            "prefix_s": (r.get("feature_cache") or {}).get("compute_s") if (r.get("feature_cache") or {}).get("applied")
            else None,
            "data_wait_pct": 100 * sum(e["train"].get("data_wait_s", 0.0) for e in ep) / sum(e["train_seconds"] for e in ep),
            "test_accuracy": r["test"][next(iter(r["test"]))]["accuracy"]}


def table(rows: list[dict]) -> str:
    head = ("| case | pipeline | precision | channels_last | compile | train img/s (epoch 1) | train img/s "
            "(later epochs) | eval img/s | s/epoch | wall s (whole run) | prefix pass s | waiting for data % | "
            "peak GPU GB | GPU util % | test acc |")
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['case']} | failed: {r['failed']} |" + " |" * 13)
            continue
        peak = "" if r["peak_gb"] is None else f"{r['peak_gb']:.2f}"
        prefix = "" if r["prefix_s"] is None else f"{r['prefix_s']:.1f}"
        util = "" if r.get("util") is None else r["util"]
        lines.append(f"| {r['case']} | {r['pipeline']} | {r['precision']} | {r['channels_last']} | {r['compile']} | "
                     f"{r['train_ips_first']:,.0f} | {r['train_ips']:,.0f} | {r['eval_ips']:,.0f} | {r['epoch_s']:.2f} | "
                     f"{r['wall_s']:.1f} | {prefix} | "
                     f"{r['data_wait_pct']:.1f} | {peak} | {util} | {r['test_accuracy']:.3f} |")
    return "\n".join(lines + ratios(rows))


def ratios(rows: list[dict]) -> list[str]:
    """Each ``X tensor`` case against its ``X loader`` twin, measured side by side in this run:
    later-epoch train img/s and s/epoch as ratios (the machine's noise cancels in part)."""
    done = {r["case"]: r for r in rows if "failed" not in r}
    out = []
    for name, r in done.items():
        twin = done.get(name.replace(" tensor", " loader")) if name.endswith(" tensor") else None
        if twin:
            out.append(f"- {name.removesuffix(' tensor')}: tensor / loader path: train img/s "
                       f"{r['train_ips'] / twin['train_ips']:.2f}x, s/epoch {r['epoch_s'] / twin['epoch_s']:.2f}x")
    return ["", "Ratios (same run, same machine):", *out] if out else []


def plan_checks(cases, common) -> None:
    """Dry run: every real case's config composes and validates, and each model builds (``tlbench
    plan``: no weights, no images), so a renamed key or model fails here, on CPU."""
    from tlbench.cli import main
    from tlbench.compose import compose

    seen = set()
    data = next(o.split("=", 1)[1] for o in common if o.startswith("dataset.root="))
    for _, overrides in cases:
        overrides = [o.replace("{big}", data) for o in overrides]
        compose([*common, *overrides, "trainer.device=cpu"])  # raises naming a bad key or value
        model = next(o for o in overrides if o.startswith("model="))
        if model in seen:
            continue
        seen.add(model)
        code = main(["plan", *common, *overrides, "trainer.device=cpu"])
        if code not in (0, None):
            raise SystemExit(f"tlbench plan failed for {overrides}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true")
    mode.add_argument("--cpu", action="store_true")
    mode.add_argument("--dry-run", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench_speed."))
    p.add_argument("--data", help="a CIFAR-10 root; default: synthetic under --out")
    p.add_argument("--epochs", type=int)
    p.add_argument("--images", type=int, help="synthetic training images (5 batches of images/5)")
    p.add_argument("--big-images", type=int, help="training images of the headline cases' data (default 50,000)")
    p.add_argument("--only", help="run the cases whose name contains this")
    p.add_argument("--work", help="synthetic data and the feature store (tens of GB for the headline case); "
                                  "default: a temporary folder outside --out, removed at the end")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_speed_work."))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TLBENCH_CACHE", str(work / "cache"))
    try:
        return _bench(a, out, work)
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)


def _bench(a, out: Path, work: Path) -> int:
    cases, common = (GPU_CASES, GPU_COMMON) if (a.gpu or a.dry_run) else (CPU_CASES, CPU_COMMON)
    epochs = a.epochs or (1 if a.dry_run else 3 if a.gpu else 2)
    images = a.images or (100 if a.dry_run else 10_000)
    data = Path(a.data) if a.data else synthetic_cifar(work / "data", images // 5, max(images // 5, 20))
    big_n = a.big_images or (100 if a.dry_run else 50_000)
    big: list[Path] = []  # made on first use: 50,000 CIFAR-sized images (synthetic; ~150 MB of pickles)
    common = [*COMMON, *common, f"dataset.root={data}", f"trainer.max_epochs={epochs}"]
    if a.dry_run:
        plan_checks(cases, common)
        common = [*common, "trainer.device=cpu"]
    sampler, rows = GpuSampler(), []
    for name, overrides in cases + (ON_REQUEST if a.only and (a.gpu or a.dry_run) else []):
        if a.only and a.only not in name:
            continue
        if any("{big}" in o for o in overrides) and not big:
            big.append(synthetic_cifar(work / "data_big", big_n // 5, max(big_n // 25, 20), seed=1))
        overrides = [o.replace("{big}", str(big[0])) if big else o for o in overrides]
        args = [*common, *overrides, *(DRY if a.dry_run else [])]
        print(f"== {name}: tlbench {' '.join(args)}", flush=True)
        r = run_case(name, args, out)
        r["util"] = sampler.mean(r["t0"], r["t1"])
        rows.append(r)
    sampler.stop.set()
    text = table(rows)
    header = describe(a, data, epochs)
    (out / "bench.md").write_text(header + "\n\n" + text + "\n")
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    print(header + "\n\n" + text)
    return 1 if any("failed" in r for r in rows) else 0


def describe(a, data: Path, epochs: int) -> str:
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    mode = "gpu" if a.gpu else "cpu" if a.cpu else "dry-run"
    return (f"bench_speed --{mode}: {dev}, torch {torch.__version__}, data {data}, {epochs} epoch(s); "
            f"'later epochs' = epochs 2.. (epoch 1 includes warm-up and compilation)")


if __name__ == "__main__":
    sys.exit(main())
