"""Hydra multirun: one run dir per job; relaunching skips finished jobs and resumes unfinished ones."""

from __future__ import annotations

import json

import pytest

import tlbench.run as run_mod
from tlbench.cli import main


def _sweep(tmp_path, *extra):
    return main(["-m", "optim.lr=0.01,0.001", "trainer.max_epochs=1", "trainer.progress=false",
                 "trainer.limit_train_batches=4", f"hydra.sweep.dir={tmp_path / 'sweep'}", *extra])


def test_relaunch_skips_finished_and_resumes_unfinished(tmp_path, monkeypatch):
    calls = []
    real = run_mod.train

    def counting(cfg, run_dir, **kw):
        calls.append((cfg.optim.lr, cfg.trainer.resume))
        return real(cfg, run_dir, **kw)

    monkeypatch.setattr(run_mod, "train", counting)
    assert _sweep(tmp_path) == 0
    assert [c[0] for c in calls] == [0.01, 0.001]
    sweep = tmp_path / "sweep"
    first = json.loads((sweep / "0" / "results.json").read_text())
    (sweep / "1" / "results.json").unlink()  # job 1 "was interrupted": last.pt but no results
    calls.clear()
    assert _sweep(tmp_path) == 0
    assert calls == [(0.001, "auto")], calls  # job 0 skipped, job 1 resumed
    assert json.loads((sweep / "0" / "results.json").read_text()) == first
    assert (sweep / "1" / "results.json").is_file()
    # without skipping, a finished job's directory is never overwritten: the job stops with exit 2
    import pytest

    with pytest.raises(SystemExit) as exc:
        _sweep(tmp_path, "sweep.skip_finished=false")
    assert exc.value.code == 2
    assert json.loads((sweep / "0" / "results.json").read_text()) == first


def _plugin(name):
    import importlib.util

    import pytest

    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (pip install tlbench[sweep])")


def test_submitit_local_launcher_runs_a_two_job_sweep(tmp_path):
    _plugin("hydra_plugins.hydra_submitit_launcher")
    assert _sweep(tmp_path, "hydra/launcher=submitit_local") == 0
    for job in ("0", "1"):
        res = json.loads((tmp_path / "sweep" / job / "results.json").read_text())
        assert res["test"]["label"]["n"] == 270


def test_optuna_sweeper_optimizes_validation(tmp_path):
    _plugin("hydra_plugins.hydra_optuna_sweeper")
    import yaml

    # the search space comes from the preset's config (conf/experiment/digits_optuna.yaml)
    code = main(["-m", "+experiment=digits_optuna", "hydra.sweeper.n_trials=2", "trainer.max_epochs=1",
                 "trainer.limit_train_batches=4", "trainer.progress=false", f"hydra.sweep.dir={tmp_path / 'opt'}"])
    assert code == 0
    best = yaml.safe_load((tmp_path / "opt" / "optimization_results.yaml").read_text())
    vals = [json.loads((tmp_path / "opt" / j / "results.json").read_text())["val"]["label"]["accuracy"]
            for j in ("0", "1")]
    assert best["best_value"] == max(vals)  # the objective is validation accuracy, never test


def test_relaunch_in_another_order_prints_where_each_skipped_job_finished(tmp_path, capsys):
    """A relaunch may number the jobs differently (here the values swapped): a skipped job's
    summary names the folder that holds its results, not Hydra's folder for it this time."""
    from pathlib import Path

    assert _sweep(tmp_path) == 0
    capsys.readouterr()
    assert main(["-m", "optim.lr=0.001,0.01", "trainer.max_epochs=1", "trainer.progress=false",
                 "trainer.limit_train_batches=4", f"hydra.sweep.dir={tmp_path / 'sweep'}"]) == 0
    shown = [Path(ln.split(": ", 1)[1]) for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("run directory: ")]
    assert shown == [(tmp_path / "sweep" / "1").resolve(), (tmp_path / "sweep" / "0").resolve()], shown
    import yaml

    lrs = [yaml.safe_load((d / ".hydra" / "config.yaml").read_text())["optim"]["lr"] for d in shown]
    assert lrs == [0.001, 0.01]


SWEEP_SYNTAX = {
    "list values": (["head.hidden=[32],[64]"], [["head.hidden=[32]"], ["head.hidden=[64]"]]),
    "choice of lists": (["head.hidden=choice([32,16],[64])"], [["head.hidden=[32,16]"], ["head.hidden=[64]"]]),
    "range": (["seed=range(0,3)"], [["seed=0"], ["seed=1"], ["seed=2"]]),
    "glob": (["optim=glob(adam*)"], [["optim=adam"], ["optim=adamw"]]),
    "comma lists": (["seed=0,1", "optim.lr=0.1,0.01"],
                    [["seed=0", "optim.lr=0.1"], ["seed=0", "optim.lr=0.01"],
                     ["seed=1", "optim.lr=0.1"], ["seed=1", "optim.lr=0.01"]]),
}


@pytest.mark.parametrize("name", list(SWEEP_SYNTAX))
def test_every_basic_sweeper_syntax_is_checked_job_by_job(name, tmp_path):
    """Hydra's list-sweep syntax (``key=[32],[64]``), choice/range/glob and comma lists are all
    accepted by the pre-sweep check (it once kept ``[32],[64]`` whole and refused it as ambiguous,
    hinting at --multirun although -m was given), and expand to the jobs the sweeper runs."""
    from tlbench.compose import compose, first_values, sweep_jobs, validate_argv

    overrides, jobs = SWEEP_SYNTAX[name]
    validate_argv(["-m", *overrides, f"hydra.sweep.dir={tmp_path / 's'}"])  # raises on a refusal
    assert sweep_jobs(overrides) == jobs
    assert first_values(overrides) == jobs[0]
    if name == "list values":
        assert [compose(j).head.hidden for j in jobs] == [(32,), (64,)]


def test_a_glob_that_matches_nothing_is_refused():
    from tlbench.compose import sweep_jobs
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError, match=r"'optim=glob\(zz\*\)' sweeps over no value"):
        sweep_jobs(["optim=glob(zz*)"])


def test_a_job_whose_freeze_plan_fails_is_refused_before_the_first_job(tmp_path, monkeypatch, capsys):
    """docs/presets.md: every job is checked before the first one starts, its model and freeze
    plan included (job #1's index 5 does not exist in the cnn's 2 blocks): exit 2 naming that
    job's overrides, nothing trained, no sweep folder."""
    calls = []
    monkeypatch.setattr(run_mod, "train", lambda *a, **k: calls.append(a))
    code = main(["-m", "freeze=index", "freeze.trainable_layers=choice([0],[5])", "trainer.max_epochs=1",
                 "trainer.progress=false", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    err = capsys.readouterr().err
    assert code == 2 and calls == [] and not (tmp_path / "sweep").exists()
    assert "sweep job #1 of 2 (freeze=index freeze.trainable_layers=[5]" in err, err
    assert "index 5 is out of range" in err and "No job was started" in err


def test_jobs_that_share_model_and_freeze_settings_share_one_plan(monkeypatch):
    """A seed x lr grid of the same model builds one plan per distinct (model, freeze, optim, ...)
    setting, not one per job: big grids stay fast."""
    from tlbench import plan
    from tlbench.compose import compose, sweep_jobs

    built = []
    real = plan.build_plan
    monkeypatch.setattr(plan, "build_plan", lambda cfg: built.append(cfg) or real(cfg))
    jobs = [(j, compose(j)) for j in sweep_jobs(["seed=0,1,2", "trainer.max_epochs=1,2", "freeze=full,linear_probe"])]
    assert len(jobs) == 12
    assert plan.check_jobs(jobs) == 2 and len(built) == 2
    assert {c.freeze.name for c in built} == {"full", "linear_probe"}


def test_a_folder_dataset_only_the_slurm_nodes_see_is_not_checked_on_the_submit_host(tmp_path):
    """With a SLURM launcher the jobs read dataset.root on their nodes: a folder missing here does
    not refuse the sweep; with a local launcher it does (job #0 would fail the same way)."""
    from tlbench import plan
    from tlbench.compose import compose
    from tlbench.errors import TlbenchError

    job = ["dataset=image_folder", f"dataset.root={tmp_path / 'node_local'}"]
    jobs = [(job, compose(job))]
    assert plan.check_jobs(jobs, remote=True) == 0
    with pytest.raises(TlbenchError, match=r"sweep job #0 of 1 \(dataset=image_folder"):
        plan.check_jobs(jobs)


def test_the_slurm_launcher_marks_the_jobs_remote(tmp_path):
    _plugin("hydra_plugins.hydra_submitit_launcher")
    from tlbench.compose import validate_argv
    from tlbench.errors import TlbenchError

    argv = ["-m", "dataset=image_folder", f"dataset.root={tmp_path / 'node_local'}", "seed=0,1",
            f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    validate_argv([*argv, "hydra/launcher=slurm"])  # the nodes may have the folder: accepted
    with pytest.raises(TlbenchError, match="sweep job #0 of 2"):
        validate_argv(argv)


@pytest.mark.parametrize("given_dir", [True, False])
def test_an_interrupted_sweep_says_to_relaunch_the_same_command(tmp_path, monkeypatch, capsys, given_dir):
    """Ctrl-C in job #0 of a 2-job sweep: trainer.resume=JOB_DIR would continue job #0 only; the
    hint is the same -m command in the same sweep folder (pinned when Hydra chose it), which
    then resumes job #0 and runs job #1."""
    import shlex

    from tlbench.engine import Interrupted

    monkeypatch.chdir(tmp_path)
    real = run_mod.train

    def interrupted(cfg, run_dir, **kw):
        raise Interrupted(2)

    monkeypatch.setattr(run_mod, "train", interrupted)
    argv = ["-m", "optim.lr=0.01,0.001", "trainer.max_epochs=1", "trainer.progress=false",
            "trainer.limit_train_batches=4", *(["hydra.sweep.dir=sw"] if given_dir else [])]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 130
    err = capsys.readouterr().err
    sweep = (tmp_path / "sw").resolve() if given_dir else next((tmp_path / "multirun").glob("*/*")).resolve()
    assert f"(this job alone: tlbench trainer.resume={sweep / '0'})" in err, err
    command = next(ln.strip() for ln in err.splitlines() if ln.strip().startswith("tlbench -m "))
    again = shlex.split(command)[1:]
    assert again == [*argv[:5], f"hydra.sweep.dir={sweep}"], again
    monkeypatch.setattr(run_mod, "train", real)
    assert main(again) == 0
    assert all((sweep / job / "results.json").is_file() for job in ("0", "1"))


def test_an_unknown_launcher_lists_every_launcher_that_works():
    """The options named are Hydra's, its installed plugins' and conf/'s (the message once listed
    conf/'s 'slurm' only, although basic and joblib work), and each of them composes."""
    import importlib.util

    from tlbench.compose import group_options, hydra_compose
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError) as exc:
        hydra_compose(["hydra/launcher=slurma"], hydra_cfg=True)
    listed = group_options("hydra/launcher")
    expected = {"basic", "slurm"} | ({"joblib"} if importlib.util.find_spec("hydra_plugins.hydra_joblib_launcher") else set())
    assert expected <= set(listed), listed
    for name in listed:
        assert f"'{name}'" in str(exc.value)
        hydra_compose([f"hydra/launcher={name}"], hydra_cfg=True)
