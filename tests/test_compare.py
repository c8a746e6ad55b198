"""``tlbench compare``: fake run directories with known numbers, plus one real 2x2-seed CPU sweep."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tlbench.compare import aggregate, collect_runs, compare_main, resolve_metric, stats
from tlbench.plots import plot
from tlbench.tables import render
from tlbench.errors import TlbenchError

T975 = {1: 12.706204736174707, 2: 4.302652729749464, 3: 3.182446305284263}  # t.ppf(0.975, df), from tables


def make_run(root: Path, name: str, *, model="cnn", freeze="full", seed=0, lr=0.001, acc=0.9, f1=0.8,
             val_acc=0.95, trainable=100, fingerprint="fp1", overrides=None, train_s=0.5, val_s=0.1,
             n_train=1000, best_epoch=2, tasks=None, results=True, last=False, config_hash=None,
             total_s=None, feature_s=None, feature_cache=None) -> Path:
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    config = {"dataset": {"name": "sklearn_digits", "split_seed": 0}, "model": {"name": model, "dropout": 0.0},
              "freeze": {"name": freeze}, "optim": {"name": "adam", "lr": lr}, "sched": {"name": "none"},
              "trainer": {"max_epochs": 2, "progress": False, "resume": None}, "seed": seed, "experiment": None}
    (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    ov = [f"model={model}", f"seed={seed}", "trainer.max_epochs=2"] if overrides is None else overrides
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(ov))
    if last:
        (d / "checkpoints").mkdir()
        (d / "checkpoints" / "last.pt").write_bytes(b"x")
    if results:
        tasks = tasks or {"label": (acc, f1)}
        res = {
            "config_hash": config_hash or f"{model}-{freeze}-{seed}-{lr}", "dataset_fingerprint": fingerprint,
            "model": model, "freeze": freeze, "seed": seed, "params": {"total": 1000, "trainable": trainable},
            "best_epoch": best_epoch, "epochs_run": 2,
            "time": {"total_s": 2 * (train_s + val_s) + 1.0 if total_s is None else total_s,
                     "feature_cache_s": feature_s, "train_s_per_epoch": train_s, "val_s_per_epoch": val_s},
            "epochs": [{"epoch": e, "train": {"loss": 1.0, "n": n_train}, "val": {"loss": 1.0, "n": 200},
                        "train_seconds": train_s, "val_seconds": val_s} for e in (1, 2)],
            "val": {t: {"accuracy": val_acc, "loss": 0.5, "macro_f1": f, "per_class": {}}
                    for t, (a, f) in tasks.items()},
            "test": {t: {"accuracy": a, "loss": 0.6, "macro_f1": f, "per_class": {}, "confusion_matrix": [[1]]}
                     for t, (a, f) in tasks.items()},
        }
        if feature_cache is not None:
            res["feature_cache"] = feature_cache
        (d / "results.json").write_text(json.dumps(res))
    return d


@pytest.fixture
def sweep(tmp_path):
    """cnn x 3 seeds, mlp x 1 seed, all finished."""
    root = tmp_path / "sweep"
    for i, (seed, acc) in enumerate([(0, 0.80), (1, 0.85), (2, 0.90)]):
        make_run(root, str(i), seed=seed, acc=acc, train_s=0.5 + 0.25 * i, val_s=0.1, best_epoch=1 + i)
    make_run(root, "3", model="mlp", seed=0, acc=0.7, trainable=5000, train_s=2.0, n_train=1000)
    return root


# ----------------------------------------------------------------------------- numbers
def test_stats_by_hand():
    n, mean, std, ci = stats([0.80, 0.85, 0.90])
    assert n == 3 and mean == pytest.approx(0.85) and std == pytest.approx(0.05)
    assert ci == pytest.approx(T975[2] * 0.05 / math.sqrt(3))
    n, mean, std, ci = stats([0.9, 0.8])
    assert (n, mean) == (2, pytest.approx(0.85)) and std == pytest.approx(math.sqrt(0.005))
    assert ci == pytest.approx(T975[1] * 0.05)  # std / sqrt(2) = 0.05
    assert stats([0.7]) == (1, 0.7, None, None)
    assert stats([]) == (0, None, None, None)


def test_aggregate_over_seeds(sweep):
    runs, problems = collect_runs([sweep])
    assert len(runs) == 4 and problems == []
    rows = aggregate(runs)
    assert [r.by for r in rows] == [("model.name",)] * 2  # only seed and model vary; seed never groups
    cnn, mlp = rows
    assert cnn.values == ("cnn",) and cnn.n == 3
    assert cnn.mean == pytest.approx(0.85) and cnn.std == pytest.approx(0.05)
    assert cnn.ci95 == pytest.approx(T975[2] * 0.05 / math.sqrt(3))
    assert cnn.trainable == 100 and cnn.best_epoch == pytest.approx(2.0)
    assert cnn.train_s == pytest.approx(0.75) and cnn.eval_s == pytest.approx(0.1)
    assert cnn.train_img_s == pytest.approx((2000 + 4000 / 3 + 1000) / 3)  # 1000 items / 0.5, 0.75, 1.0 s
    assert cnn.warnings == []
    assert mlp.values == ("mlp",) and mlp.n == 1 and mlp.mean == pytest.approx(0.7)
    assert mlp.std is None and mlp.ci95 is None and mlp.train_img_s == pytest.approx(500)


def test_group_by_keys_aliases_and_numbers(tmp_path):
    for i, (lr, seed, acc) in enumerate([(0.01, 0, 0.6), (0.001, 0, 0.8), (0.001, 1, 0.9), (0.01, 1, 0.7)]):
        make_run(tmp_path, f"r{i}", lr=lr, seed=seed, acc=acc, overrides=[f"optim.lr={lr}", f"seed={seed}"])
    make_run(tmp_path, "r9", model="mlp", freeze="linear_probe", lr=0.001, acc=0.5,
             overrides=["model=mlp", "freeze=linear_probe", "optim.lr=0.001"])
    runs, _ = collect_runs([tmp_path])
    rows = aggregate(runs, "model,optim.lr")
    assert [(r.values, r.n) for r in rows] == [(("cnn", 0.001), 2), (("cnn", 0.01), 2), (("mlp", 0.001), 1)]
    assert rows[0].mean == pytest.approx(0.85) and rows[1].mean == pytest.approx(0.65)
    assert rows[0].by == ("model.name", "optim.lr")
    # the default: overridden keys that vary across the runs (model, freeze, optim.lr), seed excluded
    assert aggregate(runs)[0].by == ("optim.lr", "model.name", "freeze.name")  # first-override order
    assert [r.n for r in aggregate(runs, ["freeze"])] == [4, 1]


def test_group_warns_about_keys_outside_by(tmp_path):
    make_run(tmp_path, "a", lr=0.01)
    make_run(tmp_path, "b", lr=0.001, seed=1)
    (row,) = aggregate(collect_runs([tmp_path])[0], "model")
    assert any("differ in keys not in --by: optim.lr" in w for w in row.warnings)


def test_metric_choice_and_tasks(tmp_path):
    make_run(tmp_path, "a", tasks={"digit": (0.9, 0.7), "language": (0.6, 0.5)})
    make_run(tmp_path, "b", seed=1, tasks={"digit": (0.8, 0.6), "language": (0.4, 0.3)})
    runs, _ = collect_runs([tmp_path])
    assert resolve_metric(runs, None).label == "test/accuracy/digit"  # first task by default
    assert aggregate(runs, "model", "test/accuracy/language")[0].mean == pytest.approx(0.5)
    assert aggregate(runs, "model", "test/macro_f1")[0].mean == pytest.approx(0.65)
    assert aggregate(runs, "model", "val/accuracy")[0].mean == pytest.approx(0.95)
    assert resolve_metric(runs, "macro_f1").label == "test/macro_f1/digit"
    with pytest.raises(TlbenchError, match="test/macro_f1"):
        aggregate(runs, "model", "test/acc")
    with pytest.raises(TlbenchError, match="unknown task 'color'.*digit"):
        aggregate(runs, "model", "test/accuracy/color")


# ----------------------------------------------------------------------------- problems and warnings
def test_unfinished_runs_are_listed(sweep):
    make_run(sweep, "4", seed=3, results=False, last=True)
    bad = make_run(sweep, "5", seed=4)
    (bad / "results.json").write_text("{truncated")
    make_run(sweep, "6", seed=5, results=False)
    runs, problems = collect_runs([sweep])
    assert len(runs) == 4
    assert [p.path.name for p in problems] == ["4", "5", "6"]
    out = render(aggregate(runs), "md", problems)
    assert f"not finished: {sweep / '4'} (has last.pt: yes) - model=cnn seed=3 trainer.max_epochs=2" in out
    assert f"not finished: {sweep / '5'} (has last.pt: no) - results.json unreadable" in out
    (sweep / "6" / ".hydra" / "overrides.yaml").unlink()
    assert f"not finished: {sweep / '6'} (has last.pt: no)\n" in render(aggregate(runs), "md", collect_runs([sweep])[1])
    assert f"% not finished: {sweep / '4'}" in render(aggregate(runs), "latex", problems)


def test_sweep_job_that_never_started_is_listed(tmp_path):
    root = tmp_path / "sweep"
    for i, (model, seed) in enumerate([("cnn", 0), ("cnn", 1), ("mlp", 0)]):
        make_run(root, str(i), model=model, seed=seed)
    hydra = {"sweep": {"dir": str(root), "subdir": "${hydra.job.num}"},
             "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper", "params": None},
             "overrides": {"task": ["model=cnn,mlp", "seed=0,1", "trainer.max_epochs=2"]}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    runs, problems = collect_runs([root])
    assert len(runs) == 3 and [p.path for p in problems] == [root / "3"]
    assert "never started (model=mlp seed=1 trainer.max_epochs=2)" in problems[0].line()
    assert collect_runs([root / "0"])[1] == []  # one job asked for: the rest of its sweep is not listed


def test_fingerprint_and_params_warnings(tmp_path):
    make_run(tmp_path, "a", fingerprint="aaaa", trainable=100)
    make_run(tmp_path, "b", seed=1, fingerprint="bbbb", trainable=120)
    rows = aggregate(collect_runs([tmp_path])[0])
    out = render(rows, "md")
    assert "Warnings:" in out
    assert "model=cnn: runs trained on different data (dataset_fingerprint aaaa, bbbb)" in out
    assert "trainable parameters differ within the group (100, 120)" in out
    assert rows[0].trainable == pytest.approx(110)


def test_same_config_and_seed_counts_once(tmp_path):
    """A run copied (or re-run) into another folder is the same (config, seed): it was counted as a
    third seed (n=3, a std and CI that shrink for nothing). Each (config, seed) counts once, the left-out
    run named with the one it repeats."""
    make_run(tmp_path, "a", seed=0, acc=0.8, config_hash="h0")
    make_run(tmp_path, "b", seed=1, acc=0.9, config_hash="h1")
    make_run(tmp_path, "copy_of_a", seed=0, acc=0.8, config_hash="h0")
    make_run(tmp_path, "rerun_of_a", seed=0, acc=0.8, config_hash="h0")
    (row,) = aggregate(collect_runs([tmp_path, tmp_path / "a"])[0])  # the same dir twice counts once
    assert row.n == 2 and row.runs == [tmp_path / "a", tmp_path / "b"]
    assert row.mean == pytest.approx(0.85) and row.std == pytest.approx(math.sqrt(0.005))
    assert row.ci95 == pytest.approx(T975[1] * 0.05) and row.stats[0].values == [0.8, 0.9]
    assert row.left_out == [tmp_path / "copy_of_a", tmp_path / "rerun_of_a"]
    (w,) = [w for w in row.warnings if "left out" in w]
    assert "2 run(s) left out: each repeats a config and seed already counted" in w
    assert f"{tmp_path / 'copy_of_a'} (repeats {tmp_path / 'a'}, config_hash h0)" in w
    assert f"{tmp_path / 'rerun_of_a'} (repeats {tmp_path / 'a'}, config_hash h0)" in w
    assert "2 runs in 1 group (2 repeated runs left out)" in render([row], "md")


def test_same_config_on_other_data_is_not_a_repeat(tmp_path):
    """The same config_hash on data with another fingerprint is another measurement (flagged as such)."""
    make_run(tmp_path, "a", acc=0.8, config_hash="h0", fingerprint="fp1")
    make_run(tmp_path, "b", acc=0.9, config_hash="h0", fingerprint="fp2")
    (row,) = aggregate(collect_runs([tmp_path])[0])
    assert row.n == 2 and not row.left_out
    assert any("different data" in w for w in row.warnings) and not any("left out:" in w for w in row.warnings)


def test_compare_command_says_which_repeats_it_left_out(tmp_path, capsys):
    make_run(tmp_path, "a", seed=0, acc=0.8, config_hash="h0")
    make_run(tmp_path, "b", seed=1, acc=0.9, config_hash="h1")
    make_run(tmp_path, "c", seed=0, acc=0.8, config_hash="h0")
    assert compare_main([str(tmp_path), "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    (row,) = list(csv.DictReader(io.StringIO(out)))
    assert row["n"] == "2"
    assert "1 run(s) left out" in err and f"{tmp_path / 'c'} (repeats {tmp_path / 'a'}" in err


# ----------------------------------------------------------------------------- formats
def test_markdown_csv_latex(sweep):
    rows = aggregate(collect_runs([sweep])[0])
    md = render(rows, "md").splitlines()
    table = [ln for ln in md if ln.startswith("|")]
    assert [c.strip() for c in table[0].strip("|").split("|")] == [
        "model", "n", "test accuracy (label) [%]", "std", "95% CI ±", "trainable params", "best epoch", "total s",
        "s/epoch", "train img/s"]
    assert table[1].startswith("|---") and table[1].endswith(":|")
    cnn = [c.strip() for c in table[2].strip("|").split("|")]
    ci = f"{100 * T975[2] * 0.05 / math.sqrt(3):.2f}"
    assert cnn[:7] == ["cnn", "3", "85.00", "5.00", ci, "100", "2.0"]
    mlp = [c.strip() for c in table[3].strip("|").split("|")]
    assert mlp[:6] == ["mlp", "1", "70.00", "", "", "5,000"]

    parsed = list(csv.reader(io.StringIO(render(rows, "csv"))))
    assert parsed[0][:3] == ["model", "n", "test accuracy (label) [%]"]
    assert parsed[1][:6] == ["cnn", "3", "85.00", "5.00", ci, "100"] and parsed[2][5] == "5000"
    assert len(parsed) == 3

    tex = render(rows, "latex")
    assert tex.startswith(r"\begin{tabular}{lrrrrrrrrr}") and r"\end{tabular}" in tex
    assert r"test accuracy (label) [\%]" in tex and r"cnn & 3 & 85.00 & 5.00 & " + ci in tex
    loss = render(aggregate(collect_runs([sweep])[0], None, "test/loss"), "csv")
    assert "test loss (label)," in loss and ",0.6000," in loss  # not a percentage: 4 decimals
    with pytest.raises(TlbenchError, match="md"):
        render(rows, "html")


def test_plot_writes_png(sweep, tmp_path):
    out = plot(aggregate(collect_runs([sweep])[0]), tmp_path / "figs" / "acc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- command
def test_compare_main_outputs(sweep, tmp_path, capsys):
    assert compare_main([str(sweep)]) == 0
    assert "| cnn " in capsys.readouterr().out
    out = tmp_path / "t.csv"
    assert compare_main([str(sweep), "--by", "model,seed", "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    rows = list(csv.reader(out.open(encoding="utf-8")))
    assert rows[0][:2] == ["model", "seed"] and len(rows) == 5  # format from the suffix
    assert (tmp_path / "p.png").is_file()
    make_run(sweep, "9", results=False)
    assert compare_main([str(sweep), "--format", "csv"]) == 0
    assert f"not finished: {sweep / '9'}" in capsys.readouterr().err  # csv keeps notes off the table


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not a directory"),
    (["{empty}"], "no run directories"),
    (["{sweep}", "--by", "modle"], "unknown config key 'modle'.*model.name.*optim.lr"),
    (["{sweep}", "--metric", "test/top5"], "available: test/accuracy"),
    (["{sweep}", "--format", "xlsx"], "xlsx"),
    (["{sweep}", "--bogus"], "unrecognized arguments"),
    (["{unfinished}"], "(?s)no finished runs.*has last.pt: yes"),
])
def test_user_errors(sweep, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    make_run(tmp_path / "unfinished", "0", results=False, last=True)
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "sweep": sweep,
             "unfinished": tmp_path / "unfinished"}
    with pytest.raises(TlbenchError, match=message):
        compare_main([a.format(**paths) for a in args])


# ----------------------------------------------------------------------------- one real sweep
@pytest.mark.slow
def test_real_sweep_compare(tmp_path):
    sweep = tmp_path / "sweep"
    exe = Path(sys.executable).with_name("tlbench")
    cmd = [str(exe) if exe.exists() else "tlbench", "-m", "model=cnn,mlp", "seed=0,1", "trainer.max_epochs=1",
           "trainer.limit_train_batches=8", "trainer.progress=false", f"hydra.sweep.dir={sweep}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs, problems = collect_runs([sweep])
    assert problems == [] and len(runs) == 4
    rows = aggregate(runs)
    assert [(r.values, r.n) for r in rows] == [(("cnn",), 2), (("mlp",), 2)]
    for row in rows:
        res = [json.loads((p / "results.json").read_text()) for p in row.runs]
        assert row.mean == pytest.approx(sum(r["test"]["label"]["accuracy"] for r in res) / 2)
        assert row.trainable > 0 and row.train_img_s > 0 and row.warnings == []
        # the cost columns, recomputed from each run's own record
        assert row.total_s == pytest.approx(sum(r["time"]["total_s"] for r in res) / 2)
        assert row.epoch_s == pytest.approx(sum(r["time"]["train_s_per_epoch"] + r["time"]["val_s_per_epoch"]
                                                for r in res) / 2)
        assert row.train_img_s == pytest.approx(sum(r["epochs"][0]["train"]["n"] / r["time"]["train_s_per_epoch"]
                                                    for r in res) / 2)
        assert all(r["time"]["total_s"] > r["time"]["train_s_per_epoch"] for r in res)
    out = tmp_path / "table.md"
    assert compare_main([str(sweep), "--out", str(out)]) == 0
    assert "| cnn " in out.read_text() and "| mlp " in out.read_text()


def test_runs_scored_on_part_of_their_test_split_are_flagged(tmp_path):
    """trainer.limit_eval_batches (results.json eval_limit): compare warns that those metrics are
    not the test split's, naming the runs and how many items they scored."""
    a = make_run(tmp_path, "a")
    make_run(tmp_path, "b", seed=1)
    res = json.loads((a / "results.json").read_text())
    res["eval_limit"] = {"trainer.limit_eval_batches": 1, "val": {"n": 64, "of": 270}, "test": {"n": 64, "of": 270}}
    (a / "results.json").write_text(json.dumps(res))
    out = render(aggregate(collect_runs([tmp_path])[0]), "md")
    assert "model=cnn: 1 run(s) scored only part of their val/test splits (trainer.limit_eval_batches" in out
    assert f"{a} (64 of 270)" in out and f"{tmp_path / 'b'} (" not in out


def test_a_failed_out_write_keeps_the_existing_file(sweep, tmp_path, monkeypatch, capsys):
    """``--out FILE`` over an existing FILE: a write that fails half-way (kill, full disk: here a
    character the encoding refuses after the table's first bytes) keeps FILE as it was, and leaves no
    temp file. It used to truncate FILE first (``write_text``), so a failed or killed compare left it
    empty. The same for ``--plot``."""
    import tlbench.compare as cmp
    import tlbench.plots as plots

    out, png = tmp_path / "o" / "table.md", tmp_path / "o" / "curve.png"
    assert compare_main([str(sweep), "--by", "model", "--out", str(out), "--plot", str(png)]) == 0
    before, before_png = out.read_bytes(), png.read_bytes()
    real = cmp.render
    monkeypatch.setattr(cmp, "render", lambda *a, **k: real(*a, **k) + "\ud800")  # fails while writing
    with pytest.raises(UnicodeEncodeError):
        compare_main([str(sweep), "--out", str(out)])
    assert out.read_bytes() == before
    monkeypatch.setattr(cmp, "render", real)

    def torn(path, **kw):
        Path(path).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots, "figure", lambda *a, **k: type("F", (), {"savefig": staticmethod(torn)})())
    with pytest.raises(OSError):
        compare_main([str(sweep), "--by", "model", "--plot", str(png)])
    assert png.read_bytes() == before_png
    assert sorted(p.name for p in out.parent.iterdir()) == ["curve.png", "table.md"]


def test_a_killed_run_is_not_listed_as_running(sweep):
    """After a kill -9 a run's status.json still says ``running`` (nothing can write at a kill -9), and
    compare listed it as ``running`` as if it were training. Now it says its process is gone and how to
    resume; a live run (here this process) is still just ``running``."""
    import socket

    for name, pid in (("7", 999999999), ("8", os.getpid())):
        d = make_run(sweep, name, seed=int(name), results=False, last=True)
        (d / "status.json").write_text(json.dumps({"state": "running", "message": "epoch 1 of 2 saved", "epoch": 1,
                                                   "step": 4, "pid": pid, "host": socket.gethostname()}))
    lines = {p.path.name: p.line() for p in collect_runs([sweep])[1]}
    assert f"running after epoch 1, but its process 999999999 is gone (killed?): tlbench trainer.resume={sweep / '7'}" \
        in lines["7"]
    assert "(running after epoch 1; has last.pt: yes)" in lines["8"]
