"""Bad configuration: exit code 2 and one paragraph naming the bad value and the valid ones."""

from __future__ import annotations

import pytest

from tlbench.cli import main


@pytest.mark.parametrize("override, expected", [
    ("model=nosuchmodel", ["nosuchmodel", "'cnn'", "'mlp'"]),
    ("dataset=nosuchdata", ["nosuchdata", "'sklearn_digits'"]),
    ("trainer.nosuchkey=1", ["nosuchkey", "max_epochs"]),
    ("+optim.nosuchkey=1", ["nosuchkey", "weight_decay"]),
    ("optim.lr=fast", ["optim.lr", "fast", "float"]),
    ("optim.lr=-0.1", ["optim.lr", "> 0"]),
    ("trainer.max_epochs=0", ["trainer.max_epochs", ">= 1"]),
    ("trainer.precision=8", ["trainer.precision", "16-mixed"]),
    ("trainer.monitor=test/accuracy", ["test/accuracy", "val/loss"]),
    ("trainer.device=tpu", ["tpu", "cuda:N"]),
    ("dataset.augment=mixup", ["mixup", "flip_crop"]),
])
def test_bad_config_exits_2(override, expected, capsys, tmp_path):
    code = main([override, f"hydra.run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 2
    for word in expected:
        assert word in err, f"{word!r} not in {err!r}"
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_value_in_a_sweep_is_caught_before_any_job_runs(capsys, tmp_path):
    code = main(["-m", "optim.lr=0.1,-1", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    assert code == 2 and "optim.lr" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_runtime_user_error_exits_2(tmp_path, capsys):
    """An error found while running (not composing) also exits 2 with one paragraph."""
    with pytest.raises(SystemExit) as exc:
        main(["dataset.val_fraction=0.0001", f"hydra.run.dir={tmp_path / 'run'}", "trainer.progress=false"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "val" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "results.json").exists()


def test_debug_flag_shows_traceback():
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError):
        main(["model=nosuchmodel", "--debug"])


def test_config_is_frozen_and_typed():
    import dataclasses

    from tlbench.compose import compose

    cfg = compose(["optim=sgd", "optim.lr=0.05", "head.hidden=[8,4]"])
    assert cfg.optim.lr == 0.05 and cfg.head.hidden == (8, 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.optim.lr = 1.0


def test_every_typed_setting_is_overridable_even_if_the_preset_omits_it():
    from conftest import REPO
    from tlbench.compose import compose

    # cifar_course_mlp selects model=mlp, freeze=full, sched=step; none of these files has the keys
    files = ("experiment/cifar_course_mlp.yaml", "model/mlp.yaml", "freeze/full.yaml", "sched/step.yaml")
    lines = [ln.split("#")[0].strip() for f in files for ln in (REPO / "conf" / f).read_text().splitlines()]
    assert not [ln for ln in lines if ln.startswith(("truncate:", "train:", "min_lr:"))]
    cfg = compose(["+experiment=cifar_course_mlp", "model.truncate=layers.0", "freeze.train=[layers.1]",
                   "sched.min_lr=0.001"])
    assert (cfg.model.truncate, cfg.freeze.train, cfg.sched.min_lr) == ("layers.0", ("layers.1",), 0.001)


def test_command_line_value_overrides_a_preset_sweep_axis():
    from tlbench.compose import hydra_compose as _hydra_compose, sweep_jobs

    params = _hydra_compose(["+experiment=cifar_course_vgg16"], hydra_cfg=True).hydra.sweeper.params
    assert "optim.lr" in params  # the preset sweeps it ...
    assert len(sweep_jobs(["+experiment=cifar_course_vgg16"])) == 3
    jobs = sweep_jobs(["+experiment=cifar_course_vgg16", "optim.lr=0.05"])
    assert len(jobs) == 1 and "optim.lr=0.05" in jobs[0]  # ... and the command line wins: one job


@pytest.mark.parametrize("order", ["smoke-first", "smoke-last"])
def test_trainer_smoke_shrinks_presets_and_later_overrides_win(order):
    """trainer=smoke is composed after the preset (the defaults list's order), wherever it is typed."""
    from tlbench.compose import compose

    def shrunk(*extra):
        args = ["+experiment=chest_xray_fe_vs_ft", "trainer=smoke"]
        return compose([*(args if order == "smoke-last" else args[::-1]), *extra])

    assert compose(["+experiment=chest_xray_fe_vs_ft"]).trainer.patience == 8
    cfg = shrunk()
    assert (cfg.trainer.max_epochs, cfg.trainer.limit_train_batches, cfg.trainer.patience) == (1, 2, None)
    assert (cfg.model.image_size, cfg.batch_size, cfg.trainer.device) == (32, 8, "cpu")
    assert cfg.optim.weight_decay == 1e-5  # the preset's other settings stand
    assert shrunk("trainer.max_epochs=2").trainer.max_epochs == 2


def test_experiment_with_and_without_plus_is_the_same_preset():
    from tlbench.compose import compose

    assert compose(["experiment=digits_mlp"]) == compose(["+experiment=digits_mlp"])
    assert compose(["experiment=digits_mlp"]).model.hidden == (128, 64)


def test_composed_config_pickles_by_reference():
    """Sweep launchers (joblib, submitit) pickle the composed config: its schema classes are
    found by name in tlbench.config, never rebuilt by value."""
    import pickle

    from omegaconf import OmegaConf

    from tlbench.compose import hydra_compose as _hydra_compose
    from tlbench.config import DatasetConfig
    from tlbench.validation import schema

    dcfg = pickle.loads(pickle.dumps(_hydra_compose(["model=mlp"])))
    assert OmegaConf.get_type(dcfg.dataset) is schema(DatasetConfig)
