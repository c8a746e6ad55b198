"""Label-efficiency runs (issue #15 item 4): ``dataset.train_fraction`` / ``dataset.train_per_class``
keep a seeded, stratified, nested part of the training split; validation and test stay the items
they are without it; and ``tlbench compare`` draws the label-efficiency curve from a small sweep."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from conftest import compose_cfg, results  # noqa: E402

from tlbench.config import DatasetConfig, config_hash  # noqa: E402
from tlbench.data import build_data  # noqa: E402
from tlbench.data.splits import kept_per_class, subset_seed, train_subset  # noqa: E402
from tlbench.errors import TlbenchError  # noqa: E402


def _spec():
    from tlbench.config import ModelConfig
    from tlbench.models.scratch import scratch_spec

    return scratch_spec(ModelConfig(name="cnn", image_size=8))


def _bundle(seed: int = 0, **kw):
    return build_data(DatasetConfig(name="sklearn_digits", **kw), _spec(), seed=seed)


def _labels(bundle, split: str) -> list[int]:
    return np.asarray(bundle.source.labels["label"])[bundle.splits[split]].tolist()


@pytest.fixture(scope="module")
def full():
    return _bundle()


# ----------------------------------------------------------------------------- the subset
@pytest.mark.parametrize("kw", [{"train_fraction": 0.1}, {"train_fraction": 0.5}, {"train_per_class": 3}])
def test_val_and_test_are_the_items_of_the_run_without_it(full, kw):
    part = _bundle(**kw)
    assert part.splits["val"] == full.splits["val"] and part.splits["test"] == full.splits["test"]
    assert set(part.splits["train"]) < set(full.splits["train"])
    assert part.class_counts["val"] == full.class_counts["val"]
    assert part.class_counts["test"] == full.class_counts["test"]
    assert part.train_subset["full_fingerprint"] == full.fingerprint  # the splits it was carved from
    assert part.fingerprint != full.fingerprint  # the data it trained on
    assert len(part.train) == part.train_subset["n"] == len(part.splits["train"])
    assert part.train_subset["n_full"] == len(full.splits["train"])


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5, 0.9])
def test_stratified_within_one_item_per_class(full, fraction):
    whole = Counter(_labels(full, "train"))
    kept = Counter(_labels(_bundle(train_fraction=fraction), "train"))
    assert set(kept) == set(whole)
    for c, n in whole.items():
        assert abs(kept[c] - fraction * n) <= 1, (c, kept[c], n)
        assert kept[c] == kept_per_class(n, fraction)
    assert abs(sum(kept.values()) - fraction * sum(whole.values())) <= len(whole)


def test_train_per_class_keeps_at_most_n_of_each_class(full):
    kept = Counter(_labels(_bundle(train_per_class=5), "train"))
    assert set(kept.values()) == {5} and len(kept) == 10
    small = np.array([0, 0, 1, 1, 1, 1, 1])
    assert Counter(small[train_subset(small, np.arange(7), seed=1, per_class=3)].tolist()) == {0: 2, 1: 3}


def test_fraction_one_is_the_whole_training_split(full):
    same = _bundle(train_fraction=1.0)
    assert same.splits == full.splits and same.fingerprint == full.fingerprint and same.train_subset is None


def test_seeded_by_split_seed_and_seed(full):
    a = _bundle(seed=0, train_fraction=0.2).splits["train"]
    np.random.seed(123)  # the global RNG plays no part
    assert _bundle(seed=0, train_fraction=0.2).splits["train"] == a
    assert _bundle(seed=1, train_fraction=0.2).splits["train"] != a  # another training seed: other items
    other = _bundle(seed=0, split_seed=1, train_fraction=0.2)
    assert other.splits["train"] != a and other.splits["val"] != full.splits["val"]
    # the subset is drawn inside the split_seed's training split, not from it again
    lab = np.arange(40) % 4
    pool = np.arange(40)
    x = train_subset(lab, pool, seed=subset_seed(0, 0), fraction=0.5)
    assert x.tolist() == train_subset(lab, pool, seed=subset_seed(0, 0), fraction=0.5).tolist()
    assert x.tolist() != train_subset(lab, pool, seed=subset_seed(1, 0), fraction=0.5).tolist()
    assert x.tolist() != train_subset(lab, pool, seed=subset_seed(0, 1), fraction=0.5).tolist()


@pytest.mark.parametrize("seed", [0, 3])
def test_nested_for_one_seed(seed):
    fractions = [0.05, 0.1, 0.25, 0.5, 0.75, 1.0]
    kept = [set(_bundle(seed=seed, train_fraction=f).splits["train"]) for f in fractions]
    for small, large in zip(kept, kept[1:]):
        assert small < large
    per_class = [set(_bundle(seed=seed, train_per_class=n).splits["train"]) for n in (1, 3, 10)]
    assert per_class[0] < per_class[1] < per_class[2]


def test_every_class_keeps_an_item_or_a_clear_error():
    lab = np.array([0] * 3 + [1] * 40)
    assert Counter(lab[train_subset(lab, np.arange(43), seed=0, fraction=0.2)].tolist()) == {0: 1, 1: 8}
    with pytest.raises(TlbenchError, match=r"train_fraction=0\.1 keeps no training item of the smallest class "
                                           r"\(it has 3 .*train_fraction >= 0\.167 or dataset\.train_per_class=1"):
        train_subset(lab, np.arange(43), seed=0, fraction=0.1)
    with pytest.raises(TlbenchError, match="smallest class"):  # and from the dataset: 10 per class, 7 in train
        _bundle(limit_per_class=10, val_fraction=0.15, test_fraction=0.15, train_fraction=0.05)


def test_multitask_subset_is_stratified_by_the_combined_labels(tmp_path):
    import fixtures_data as fx

    root = tmp_path / "hd"
    fx.write_handwritten_digits(root, per_digit=10)
    kw = dict(name="handwritten_digits", root=str(root), task="multitask")
    full = build_data(DatasetConfig(**kw), _spec(), seed=0)
    part = build_data(DatasetConfig(**kw, train_fraction=0.5), _spec(), seed=0)
    assert part.splits["val"] == full.splits["val"] and part.splits["test"] == full.splits["test"]
    pairs = lambda b: Counter(zip(*(np.asarray(b.source.labels[t])[b.splits["train"]].tolist()  # noqa: E731
                                    for t in ("digit", "language"))))
    whole, kept = pairs(full), pairs(part)
    assert set(kept) == set(whole) and all(abs(kept[k] - 0.5 * n) <= 1 for k, n in whole.items())


# ----------------------------------------------------------------------------- the config
@pytest.mark.parametrize("override, message", [
    ("dataset.train_fraction=0", r"dataset.train_fraction=0.0 is out of range; it must be > 0.0 \(the part"),
    ("dataset.train_fraction=1.5", r"dataset.train_fraction=1.5 is out of range; it must be <= 1.0"),
    ("dataset.train_fraction=-0.1", r"must be > 0.0"),
    ("dataset.train_per_class=0", r"dataset.train_per_class=0 is out of range; it must be >= 1"),
    ("dataset.train_per_class=2,dataset.train_fraction=0.5", r"both shrink the training split; set one of them"),
])
def test_bad_values_are_user_errors(cli, override, message, capsys):
    code, run_dir = cli(*override.split(","), "trainer.max_epochs=1")
    assert code == 2
    import re

    assert re.search(message, capsys.readouterr().err)
    assert not (run_dir / "results.json").exists()


def test_keys_are_part_of_the_config_hash():
    base = compose_cfg()
    assert (base.dataset.train_fraction, base.dataset.train_per_class) == (1.0, None)
    hashes = {config_hash(compose_cfg(*o)) for o in
              ([], ["dataset.train_fraction=0.5"], ["dataset.train_fraction=0.25"], ["dataset.train_per_class=5"])}
    assert len(hashes) == 4


# ----------------------------------------------------------------------------- a run
def test_run_records_the_subset(cli, tmp_path):
    code, run_dir = cli("dataset.train_fraction=0.25", "seed=1", "trainer.max_epochs=1")
    assert code == 0
    splits, r = json.loads((run_dir / "splits.json").read_text()), results(run_dir)
    full = _bundle()
    assert splits["val"] == full.splits["val"] and splits["test"] == full.splits["test"]
    assert splits["train"] == _bundle(seed=1, train_fraction=0.25).splits["train"]
    sub = splits["train_subset"]
    assert (sub["train_fraction"], sub["train_per_class"], sub["seed"]) == (0.25, None, [0, 1])
    assert sub["n"] == len(splits["train"]) and sub["n_full"] == len(full.splits["train"])
    assert r["train_subset"] == sub
    assert r["epochs"][0]["train"]["n"] == len(splits["train"])
    assert sum(r["class_counts"]["train"]["label"].values()) == len(splits["train"])


# ----------------------------------------------------------------------------- the curve
def _fake_curve(root: Path) -> dict:
    """Fake finished runs: init_from (scratch | a CAE run dir) x train_fraction x seeds, known accuracies."""
    import yaml

    from test_compare import make_run

    accs = {(None, 0.1): [0.50, 0.60, 0.55], (None, 0.5): [0.70, 0.80], (None, 1.0): [0.90],
            ("/runs/pre/cae/0", 0.1): [0.65, 0.70, 0.75], ("/runs/pre/cae/0", 1.0): [0.92, 0.94]}
    for (init, frac), values in accs.items():
        for seed, acc in enumerate(values):
            d = make_run(root, f"{init is not None}_{frac}_{seed}", seed=seed, acc=acc, config_hash=f"{init}{frac}{seed}",
                         overrides=[f"dataset.train_fraction={frac}", f"seed={seed}"])
            cfg = yaml.safe_load((d / ".hydra" / "config.yaml").read_text())
            cfg["model"]["init_from"], cfg["dataset"]["train_fraction"] = init, frac
            (d / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    return accs


def _stats(values):
    import statistics

    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


@pytest.mark.parametrize("errorbar", ["std", "ci", "none"])
def test_curve_lines_are_the_tables_means(tmp_path, errorbar):
    from matplotlib.collections import PathCollection, PolyCollection

    from tlbench.compare import aggregate, collect_runs
    from tlbench.plots import curve_series, figure, is_curve

    accs = _fake_curve(tmp_path)
    rows = aggregate(collect_runs([tmp_path])[0], "model.init_from,dataset.train_fraction")
    assert is_curve(rows)
    lines = curve_series(rows, 0, errorbar)
    assert [line.label for line in lines] == ["…/cae/0", "scratch"]  # rows sort str before null
    for line, init in zip(lines, ["/runs/pre/cae/0", None]):
        fracs = sorted(f for i, f in accs if i == init)
        assert line.x == fracs
        for x, mean, err, n in zip(line.x, line.mean, line.err, line.n):
            row = next(r for r in rows if r.values == (init, x))
            assert mean == pytest.approx(100 * row.mean) == pytest.approx(100 * _stats(accs[init, x])[0])
            want = {"std": row.std, "ci": row.ci95, "none": None}[errorbar]
            assert err == (None if want is None else pytest.approx(100 * want)) and n == row.n
        assert sorted((x, round(y, 6)) for x, y in line.runs) == sorted((f, round(100 * a, 6)) for f in fracs
                                                                         for a in accs[init, f])
    assert [line.x for line in curve_series(rows[::-1], 0, errorbar)][::-1] == [line.x for line in lines]  # ascending
    (ax,) = figure(rows, errorbar=errorbar, xscale="log").axes
    drawn = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()}
    assert drawn == {line.label: (line.x, pytest.approx(line.mean)) for line in lines}
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == (0 if errorbar == "none" else 2)
    for band, line in zip(bands, lines):  # the band spans mean ± err where there is one
        ys = band.get_paths()[0].vertices[:, 1]
        spread = [(m - e, m + e) for m, e in zip(line.mean, line.err) if e is not None]
        assert min(ys) == pytest.approx(min(lo for lo, _ in spread))
        assert max(ys) == pytest.approx(max(hi for _, hi in spread))
    dots = sorted(round(float(y), 6) for c in ax.collections if isinstance(c, PathCollection)
                  for _, y in c.get_offsets())
    assert dots == sorted(round(100 * a, 6) for vs in accs.values() for a in vs)
    assert ax.get_xscale() == "log" and ax.get_xlabel() == "train fraction (log scale)"
    assert ax.get_legend().get_title().get_text() == "init from"
    band = {"std": ", band: 1 std", "ci": ", band: 95% CI (t, n-1)", "none": ""}[errorbar]
    assert ax.get_title(loc="left") == f"line: mean{band}, dots: runs"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["…/cae/0", "scratch"]


def test_not_a_curve_keeps_the_bars(tmp_path):
    from tlbench.compare import aggregate, collect_runs, compare_main
    from tlbench.plots import figure, is_curve

    _fake_curve(tmp_path)
    runs = collect_runs([tmp_path])[0]
    rows = aggregate(runs, "dataset.train_fraction,model.init_from")  # last key not numeric
    assert not is_curve(rows)
    (ax,) = figure(rows).axes
    assert ax.get_xlabel() == "train fraction, init from" and not ax.get_legend().get_title().get_text()
    one = aggregate([r for r in runs if r.config["dataset"]["train_fraction"] == 0.1], "dataset.train_fraction")
    assert not is_curve(one)  # one value: nothing to draw a line through
    with pytest.raises(TlbenchError, match="--xscale 'ln': choose one of auto, linear, log"):
        figure(rows, xscale="ln")
    with pytest.raises(TlbenchError, match=r"--plot-kind curve: the last --by key \(model.init_from\) must be numeric"):
        compare_main([str(tmp_path), "--by", "dataset.train_fraction,model.init_from", "--plot",
                      str(tmp_path / "x.png"), "--plot-kind", "curve"])
    curve = aggregate(runs, "model.init_from,dataset.train_fraction")
    assert figure(curve).axes[0].get_xlabel() == "train fraction"  # numeric last key: a curve by default ...
    assert figure(curve, kind="bars").axes[0].get_xlabel() == "init from, train fraction"  # ... bars when asked


def test_xscale_auto_is_log_when_the_values_span_more_than_10x(tmp_path):
    from tlbench.compare import aggregate, collect_runs, compare_main
    from tlbench.plots import figure

    _fake_curve(tmp_path)  # 0.1 .. 1.0
    rows = aggregate(collect_runs([tmp_path])[0], "model.init_from,dataset.train_fraction")
    assert figure(rows).axes[0].get_xscale() == "linear"
    assert figure(rows, xscale="log").axes[0].get_xscale() == "log"
    svg = tmp_path / "c.svg"
    assert compare_main([str(tmp_path), "--by", "model.init_from,dataset.train_fraction", "--plot", str(svg),
                         "--xscale", "log"]) == 0
    assert "train fraction (log scale)" in svg.read_text()
    wide = [r for r in rows if r.values[1] != 0.5]
    for r in wide:
        r.values = (r.values[0], r.values[1] / 10 if r.values[1] < 1 else r.values[1])  # 0.01 .. 1.0
    assert figure(wide).axes[0].get_xscale() == "log"
    assert [t.get_text() for t in figure(wide).axes[0].get_xticklabels()] == ["0.01", "1"]


@pytest.mark.slow
def test_small_sweep_gives_the_curve(tmp_path, capsys):
    """-m dataset.train_fraction=0.5,1.0 seed=0,1 on the embedded digits, 1 epoch: val/test the same
    items in every run, the 50 % runs train on half, and compare draws one line through both fractions."""
    from tlbench.cli import main
    from tlbench.compare import aggregate, collect_runs, compare_main
    from tlbench.plots import curve_series

    sweep = tmp_path / "sweep"
    assert main(["-m", "dataset.train_fraction=0.5,1.0", "seed=0,1", "trainer.max_epochs=1", "trainer.progress=false",
                 f"hydra.sweep.dir={sweep}"]) == 0
    runs, problems = collect_runs([sweep])
    assert problems == [] and len(runs) == 4
    splits = {(r.config["dataset"]["train_fraction"], r.config["seed"]): json.loads((r.path / "splits.json").read_text())
              for r in runs}
    for s in splits.values():
        assert (s["val"], s["test"]) == (splits[1.0, 0]["val"], splits[1.0, 0]["test"])
    assert splits[1.0, 0]["train"] == splits[1.0, 1]["train"]
    for seed in (0, 1):
        assert set(splits[0.5, seed]["train"]) < set(splits[1.0, seed]["train"])
        assert abs(len(splits[0.5, seed]["train"]) - len(splits[1.0, seed]["train"]) / 2) <= 10
    assert splits[0.5, 0]["train"] != splits[0.5, 1]["train"]
    rows = aggregate(runs, "dataset.train_fraction")
    assert all(r.warnings == [] for r in rows)  # the seeds' different subsets are by design, not "other data"
    (line,) = curve_series(rows, 0, "std")
    assert line.x == [0.5, 1.0] and line.n == [2, 2]
    for x, mean in zip(line.x, line.mean):
        accs = [results(r.path)["test"]["label"]["accuracy"] for r in runs
                if r.config["dataset"]["train_fraction"] == x]
        assert mean == pytest.approx(100 * sum(accs) / 2)
    out = tmp_path / "curve.png"
    assert compare_main([str(sweep), "--by", "dataset.train_fraction", "--plot", str(out), "--errorbar", "std"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| train fraction |" in capsys.readouterr().out
