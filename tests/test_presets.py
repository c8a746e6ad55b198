"""The experiment presets (conf/experiment/*.yaml): each composes, its sweep grid is what its
comments promise and every job of it is a valid config, and each trains shrunk (trainer=smoke,
random init, 1 epoch of 2 batches at 32 px) on a tiny fixture dataset in its official layout.

Pretrained weights are not available offline, so every run uses model.pretrained=false.
``trainer=smoke`` needs no help: the trainer group is composed after the preset (the defaults
list's order), so it shrinks every preset; only a preset's sweep axes (``hydra.sweeper.params``
are overrides, like the command line) beat it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, compose_cfg, results
from fixtures_data import write_chest_xray, write_cifar10, write_emnist, write_handwritten_digits

PRESETS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
SHRINK = ["trainer=smoke", "model.pretrained=false"]
# No run here is marked slow: on 2 idle CPU cores each takes < 6 s (DeiT-B at 32 px is the slowest);
# the whole file takes ~40 s idle, ~75 s when the machine is shared.


def sweep_jobs(name: str) -> list[list[str]]:
    """The jobs `tlbench -m +experiment=NAME` runs (the preset's hydra.sweeper.params grid), as
    tlbench checks them before any runs; [] for an Optuna search space (its jobs are sampled;
    tests/test_sweeps.py runs one)."""
    from tlbench.compose import sweep_jobs as jobs_of

    return [[o for o in job if o != f"experiment={name}"] for job in jobs_of([f"+experiment={name}"]) or []]


# ----------------------------------------------------------------------------- composing
def test_expected_presets_exist():
    expected = {"paper_single_block", "paper_single_block_densenet201", "cifar_course_mlp", "cifar_course_cnn",
                "cifar_course_cnn_bn", "cifar_course_vgg16", "thai_multitask", "emnist_small_cnn",
                "emnist_small_cnn_final", "chest_xray_fe_vs_ft", "digits_mlp"}
    assert expected <= set(PRESETS), expected - set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_file_is_global_commented_and_named(name):
    text = (REPO / "conf" / "experiment" / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == "# @package _global_"
    assert sum(line.lstrip().startswith("#") for line in text.splitlines()) >= 3, "presets are commented"
    assert yaml.safe_load(text)["experiment"] == name
    assert "/work/" not in text, "no machine-specific paths in presets"


@pytest.mark.parametrize("name", PRESETS)
def test_preset_and_every_sweep_job_compose(name):
    cfg = compose_cfg(f"+experiment={name}")
    assert cfg.experiment == name
    if cfg.dataset.name != "sklearn_digits":
        assert cfg.dataset.root == f"data/{cfg.dataset.name}"  # the group's default; override with dataset.root=
    seen = set()
    for job in sweep_jobs(name):
        key = tuple(o for o in job if not o.startswith("seed="))  # (the seed axis cannot break a config)
        if key not in seen:
            seen.add(key)
            compose_cfg(f"+experiment={name}", *job)


@pytest.mark.parametrize("name", PRESETS)
def test_prevalidation_checks_exactly_the_jobs_hydra_runs(name):
    """tlbench validates every job before a sweep starts: the same jobs, in the same order, as
    Hydra's basic sweeper runs (a command-line value replaces the preset's axis, also seed)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from tlbench.compose import hydra_compose as _hydra_compose
    from tlbench.compose import sweep_jobs as jobs_of

    cmd = [f"experiment={name}", "seed=0,1"]
    params = _hydra_compose(cmd[:1], hydra_cfg=True).hydra.sweeper.params or {}
    ours = jobs_of(cmd)
    if any("interval(" in str(v) for v in params.values()):
        assert ours is None  # an Optuna search space: Optuna checks it
        return
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + cmd)
    assert ours == [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


# what `tlbench -m +experiment=NAME` sweeps: {axis: values}
GRIDS = {
    "paper_single_block": {"model": ["densenet201", "deit_base_distilled", "cait_s24"]},
    "paper_single_block_densenet201": {"model": ["densenet201"], "seed": ["0", "1", "2"]},
    "cifar_course_mlp": {"optim.lr": ["0.1", "0.01", "0.001", "0.0001"], "sched": ["none"],
                         "trainer.max_epochs": ["10"]},
    "cifar_course_cnn": {"model.batch_norm": ["False", "True"], "model.dropout": ["0.0", "0.2"]},
    "cifar_course_cnn_bn": {"model.batch_norm": ["False", "True"], "model.dropout": ["0.0", "0.2"]},
    "cifar_course_vgg16": {"optim.lr": ["0.01", "0.001", "0.0001"]},
    "thai_multitask": {"dataset.task": ["digit", "language", "multitask"]},
    "emnist_small_cnn": {"head.hidden": ["[32]", "[64]"], "optim": ["adam", "sgd"],
                         "optim.lr": ["0.1", "0.01", "0.001"], "seed": ["0", "1", "2", "3", "4"]},
    "emnist_small_cnn_final": {"head.hidden": ["[64]"], "optim": ["adam"], "optim.lr": ["0.001"],
                               "seed": ["0", "1", "2", "3", "4"]},
    "chest_xray_fe_vs_ft": {"freeze": ["linear_probe", "full"], "model.pretrained": ["True", "False"]},
    "digits_mlp": {},
    "english_to_thai": {"dataset.train_fraction": ["0.1", "0.25", "1.0"], "seed": ["0", "1", "2"]},
    "emnist_cae_transfer": {"model": ["cnn"], "model.init_from": ["outputs/emnist_cae_transfer/cae", "null"],
                            "freeze": ["linear_probe", "full"], "seed": ["0", "1", "2"]},
}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_sweep_grid(name):
    jobs = sweep_jobs(name)
    axes: dict[str, list[str]] = {}
    for job in jobs:
        for o in job:
            key, value = o.split("=", 1)
            axes.setdefault(key, [])
            if value not in axes[key]:
                axes[key].append(value)
    assert axes == GRIDS[name]
    n = 1
    for values in GRIDS[name].values():
        n *= len(values)
    assert len(jobs) == n


def test_reference_settings():
    """The settings each preset takes from its reference (spot checks of the composed config)."""
    c = compose_cfg("+experiment=paper_single_block")
    assert (c.dataset.name, c.model.name, c.freeze.name, c.optim.name, c.optim.lr) == (
        "cifar10", "densenet201", "last_block", "adam", 1e-4)
    assert (c.batch_size, c.trainer.max_epochs, c.dataset.augment, c.model.pretrained) == (32, 10, "flip", True)
    assert c.model.image_size is None  # 224, the models' own size
    c = compose_cfg("+experiment=paper_single_block_densenet201")
    assert (c.freeze.name, c.freeze.train, c.optim.lr) == ("pattern", ("features.denseblock4.denselayer16",), 1e-4)
    c = compose_cfg("+experiment=cifar_course_vgg16")
    assert (c.model.name, c.freeze.name, c.freeze.n, c.head.hidden) == ("vgg16", "first_n", 8, (256, 128))
    assert (c.optim.name, c.optim.lr, c.optim.head_lr, c.optim.momentum, c.optim.weight_decay) == (
        "sgd", 1e-3, 1e-2, 0.9, 1e-3)
    assert (c.dataset.val_fraction, c.dataset.augment) == (0.1, "flip_crop")
    c = compose_cfg("+experiment=thai_multitask")
    assert (c.model.truncate, c.dataset.task, c.batch_size, c.seed) == ("features.7", "multitask", 16, 4912)
    assert (c.dataset.val_fraction, c.dataset.test_fraction) == (0.15, 0.15)
    c = compose_cfg("+experiment=emnist_small_cnn")
    assert (c.dataset.split, c.model.channels, c.model.in_chans, c.eval.topk) == (
        "balanced", (4, 8, 16, 32), 1, (1, 3))
    c = compose_cfg("+experiment=chest_xray_fe_vs_ft")
    assert (c.model.name, c.freeze.name, c.dataset.classes, c.eval.positive_class) == (
        "vgg19_bn", "linear_probe", ("Covid", "Normal"), "Covid")
    assert (c.optim.lr, c.optim.weight_decay, c.trainer.patience, c.trainer.monitor) == (1e-3, 1e-5, 8, "val/loss")


# ----------------------------------------------------------------------------- shrunk runs
def _data(tmp_path: Path, dataset: str) -> list[str]:
    root = tmp_path / "data" / dataset
    if dataset == "cifar10":
        write_cifar10(root, per_batch=20, n_test=20)
    elif dataset == "emnist":
        write_emnist(root, n_train=47 * 5, n_test=47)
    elif dataset == "handwritten_digits":
        write_handwritten_digits(root, per_digit=8)  # 160 images: every (digit, language) pair in val and test
    elif dataset == "chest_xray":
        write_chest_xray(root, train={"Covid": 8, "Normal": 8, "Viral_Pneumonia": 4},
                         test={"Covid": 3, "Normal": 3, "Viral_Pneumonia": 2})
    else:
        return []
    return [f"dataset.root={root}"]


def _check_thai(r):
    assert set(r["test"]) == {"digit", "language"}  # two heads, reported separately
    assert set(r["class_counts"]["test"]["language"]) == {"English", "Thai"}


def _check_chest(r):
    t = r["test"]["label"]
    assert t["positive_class"] == "Covid"
    for key in ("accuracy", "sensitivity", "specificity", "macro_precision", "macro_recall", "macro_f1"):
        assert 0.0 <= t[key] <= 1.0
    assert set(r["class_counts"]["test"]["label"]) == {"Covid", "Normal"}
    assert r["params"]["trainable"] == 512 * 2 + 2  # feature extraction: only the Linear head trains


CHECKS = {
    "paper_single_block_densenet201": lambda r: r["params"]["trainable"] == 235_210,  # the notebook's count
    "paper_single_block": lambda r: r["params"]["trainable"] == 305_610,  # denselayer32 + norm5 + head
    "cifar_course_vgg16": lambda r: r["params"]["trainable"] == 5 * 2_359_808 + 512 * 256 + 256 + 256 * 128 + 128 + 1290,
    "cifar_course_mlp": lambda r: r["params"]["trainable"] == 3072 * 256 + 256 + 256 * 128 + 128 + 1290,
    "emnist_small_cnn": lambda r: "top3_accuracy" in r["test"]["label"],
    "emnist_small_cnn_final": lambda r: "top3_accuracy" in r["test"]["label"],
    "thai_multitask": _check_thai,
    "english_to_thai": lambda r: set(r["tasks"]) == {"digit"} and r["train_subset"] is None
    and sum(r["class_counts"]["test"]["digit"].values()) == 12,  # Thai only: 15 % of 80 fixture images
    "chest_xray_fe_vs_ft": _check_chest,
    "emnist_cae_transfer": lambda r: set(r["test"]["reconstruction"]) >= {"mse", "psnr", "ssim"},  # step 1: the cae
}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_runs_shrunk(cli, tmp_path, name):
    dataset = compose_cfg(f"+experiment={name}").dataset.name
    code, run_dir = cli(f"+experiment={name}", *SHRINK, *_data(tmp_path, dataset))
    assert code == 0
    r = results(run_dir)
    assert r["epochs_run"] == 1
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["experiment"] == name
    check = CHECKS.get(name)
    if check is not None:
        assert check(r) is not False, json.dumps(r["params"])


def test_sweep_runs_every_job(tmp_path):
    """`tlbench -m +experiment=cifar_course_mlp` runs the preset's lr grid, one run dir per job."""
    from tlbench.cli import main

    sweep = tmp_path / "sweep"
    # the preset sweeps trainer.max_epochs (10): a sweep axis is an override, so it beats trainer=smoke,
    # and the command line's value replaces the axis
    code = main(["-m", "+experiment=cifar_course_mlp", *SHRINK, "trainer.max_epochs=1",
                 *_data(tmp_path, "cifar10"), f"hydra.sweep.dir={sweep}"])
    assert code == 0
    lrs = []
    for job in sorted(sweep.glob("[0-9]*"), key=lambda p: int(p.name)):
        cfg = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert (cfg["sched"]["name"], cfg["trainer"]["max_epochs"]) == ("none", 1)  # the command line still wins
        assert (job / "results.json").is_file()
        lrs.append(cfg["optim"]["lr"])
    assert lrs == [0.1, 0.01, 0.001, 0.0001]


@pytest.mark.parametrize("model", ["deit_base_distilled", "cait_s24"])
def test_paper_single_block_sweep_models_run(cli, tmp_path, model):
    """The other two models of paper_single_block's sweep (ViTs at 32 px, random init)."""
    code, run_dir = cli("+experiment=paper_single_block", f"model={model}", *SHRINK, *_data(tmp_path, "cifar10"))
    assert code == 0
    trainable = results(run_dir)["params"]["trainable"]
    # the last block (+ final norm) and the head(s): DeiT has two heads (class and distillation token)
    assert trainable == {"deit_base_distilled": 7_104_788, "cait_s24": 1_779_850}[model]
