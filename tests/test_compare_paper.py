"""``tlbench compare`` for a paper (#16): cost columns recomputed from results.json, several metrics
at once, rounded keys, readable labels, and the plot's options checked on what it draws."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import struct
import xml.etree.ElementTree as ET

import pytest

from tlbench.compare import aggregate, collect_runs, compare_main
from tlbench.errors import TlbenchError
from tlbench.plots import figure, plot
from tlbench.tables import key_headers, metric_name, render, table

from test_compare import T975, make_run


def _rows(md: str) -> list[list[str]]:
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in md.splitlines() if ln.startswith("|")]


def _col(head: list[str], body: list[list[str]], name: str) -> list[str]:
    return [r[head.index(name)] for r in body]


# ----------------------------------------------------------------------------- costs
def test_cost_columns_recomputed_from_results(tmp_path):
    """total s = the run's wall time (feature pass included), s/epoch = train + val epoch,
    img/s only for runs that trained on images, the feature pass in its own column."""
    make_run(tmp_path, "a", model="cnn", seed=0, train_s=0.4, val_s=0.1, total_s=9.0, n_train=1000)
    make_run(tmp_path, "b", model="cnn", seed=1, train_s=0.6, val_s=0.1, total_s=11.0, n_train=1000)
    probe = {"applied": True, "reason": "the whole backbone is frozen", "compute_s": 4.0, "reused": False}
    make_run(tmp_path, "c", model="mlp", seed=0, train_s=0.02, val_s=0.01, total_s=6.5, feature_s=4.0,
             feature_cache=probe)
    make_run(tmp_path, "d", model="mlp", seed=1, train_s=0.04, val_s=0.01, total_s=7.5, feature_s=5.0,
             feature_cache=dict(probe, compute_s=5.0))
    runs, _ = collect_runs([tmp_path])
    rows = aggregate(runs, "model")
    for row in rows:
        res = [json.loads((p / "results.json").read_text()) for p in row.runs]
        assert row.total_s == pytest.approx(sum(r["time"]["total_s"] for r in res) / 2)
        per_epoch = [r["time"]["train_s_per_epoch"] + r["time"]["val_s_per_epoch"] for r in res]
        assert row.epoch_s == pytest.approx(sum(per_epoch) / 2)
    cnn, mlp = rows
    assert cnn.train_img_s == pytest.approx((1000 / 0.4 + 1000 / 0.6) / 2) and cnn.feature_s is None
    assert mlp.train_img_s is None  # trained on stored features: images per second would be a fiction
    assert mlp.feature_s == pytest.approx(4.5)
    head, body = table(rows)
    assert head[-5:] == ["best epoch", "total s", "feature pass s", "s/epoch", "train img/s"]
    assert _col(head, body, "total s") == ["10.00", "7.00"]
    assert _col(head, body, "feature pass s") == ["", "4.50"]
    assert _col(head, body, "s/epoch") == ["0.600", "0.040"]
    assert _col(head, body, "train img/s") == [f"{(2500 + 1000 / 0.6) / 2:,.0f}", ""]
    md = render(rows, "md")
    assert "total s: wall time of a whole run (setup, feature pass, training, evaluation)" in md
    assert "blank where a run trained on stored features" in md
    # without any feature pass the column is not there
    assert "feature pass s" not in table(aggregate(runs[:2], "model"))[0]


def test_resumed_and_reused_runs_say_what_their_times_are(tmp_path):
    d = make_run(tmp_path, "resumed", train_s=3.0, val_s=1.0, total_s=2.0)  # epochs sum to 8 s > 2 s
    make_run(tmp_path, "reused", seed=1, train_s=0.5, val_s=0.1, total_s=3.0, feature_s=0.2,
             feature_cache={"applied": True, "compute_s": 0.2, "reused": True})
    (row,) = aggregate(collect_runs([tmp_path])[0], "model")
    assert row.total_s == pytest.approx((8.0 + 3.0) / 2)  # the lower bound, not the last session's 2 s
    assert any("1 run(s) were resumed" in w and "lower bound" in w for w in row.warnings)
    assert any("1 run(s) read their features from the feature store" in w for w in row.warnings)
    assert any("some runs trained on stored features, some on images" in w for w in row.warnings)
    # a resume that train.log records is caught even when the epochs fit in the last session
    (d / "results.json").write_text((d / "results.json").read_text().replace('"total_s": 2.0', '"total_s": 20.0'))
    (d / "train.log").write_text(f"[..][tlbench.run][INFO] - resumed from {d}/checkpoints/last.pt at epoch 1\n")
    (row,) = aggregate(collect_runs([tmp_path / "resumed"])[0], "model")
    assert row.total_s == pytest.approx(20.0) and any("were resumed" in w for w in row.warnings)


# ----------------------------------------------------------------------------- several metrics
def test_several_metrics_at_once(tmp_path):
    for seed, (acc, f1) in enumerate([(0.80, 0.70), (0.90, 0.60)]):
        make_run(tmp_path, f"cnn{seed}", seed=seed, acc=acc, f1=f1)
    make_run(tmp_path, "mlp0", model="mlp", acc=0.5, f1=0.4)
    runs, _ = collect_runs([tmp_path])
    rows = aggregate(runs, "model", "test/accuracy,test/macro_f1,val/loss")
    assert [s.metric.label for s in rows[0].stats] == ["test/accuracy/label", "test/macro_f1/label", "val/loss/label"]
    cnn = rows[0]
    for s, name, split in zip(cnn.stats, ("accuracy", "macro_f1", "loss"), ("test", "test", "val")):
        vals = [json.loads((p / "results.json").read_text())[split]["label"][name] for p in cnn.runs]
        assert s.values == pytest.approx(vals) and s.mean == pytest.approx(sum(vals) / 2)
        assert s.std == pytest.approx(abs(vals[0] - vals[1]) / math.sqrt(2))
        assert s.ci95 == pytest.approx(T975[1] * s.std / math.sqrt(2))
    assert cnn.mean == cnn.stats[0].mean  # the first metric is the row's headline
    parsed = list(csv.reader(io.StringIO(render(rows, "csv"))))
    head = parsed[0]
    assert head[:8] == ["model", "n", "test accuracy (label) [%]", "std (test accuracy (label))",
                        "95% CI ± (test accuracy (label))", "test macro F1 (label) [%]",
                        "std (test macro F1 (label))", "95% CI ± (test macro F1 (label))"]
    assert head[8:11] == ["val loss (label)", "std (val loss (label))", "95% CI ± (val loss (label))"]
    assert len(set(head)) == len(head)  # CSV columns stay addressable by name
    assert parsed[1][:11] == ["cnn", "2", "85.00", "7.07", f"{100 * T975[1] * 0.05:.2f}", "65.00", "7.07",
                              f"{100 * T975[1] * 0.05:.2f}", "0.5000", "0.0000", "0.0000"]
    assert parsed[2][2:11] == ["50.00", "", "", "40.00", "", "", "0.5000", "", ""]
    md = render(rows, "md")
    assert md.startswith("test accuracy (label); test macro F1 (label); val loss (label): mean")
    assert _rows(md)[0][:8] == ["model", "n", "test accuracy (label) [%]", "std", "95% CI ±",
                                "test macro F1 (label) [%]", "std", "95% CI ±"]  # short: position tells
    assert aggregate(runs, "model", "test/accuracy,test/accuracy")[0].stats.__len__() == 1  # no repeats
    with pytest.raises(TlbenchError, match="--metric 'test/acc'"):
        aggregate(runs, "model", "test/accuracy,test/acc")


def test_several_metrics_from_the_command_line(tmp_path, capsys):
    make_run(tmp_path, "a", acc=0.8, f1=0.7)
    make_run(tmp_path, "b", seed=1, acc=0.9, f1=0.8)
    assert compare_main([str(tmp_path), "--metric", "test/accuracy,test/macro_f1", "--format", "csv"]) == 0
    parsed = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert parsed[0][2] == "test accuracy (label) [%]" and parsed[0][5] == "test macro F1 (label) [%]"
    assert parsed[1][2] == "85.00" and parsed[1][5] == "75.00"


# ----------------------------------------------------------------------------- keys and labels
def test_float_keys_are_rounded_but_kept_apart(tmp_path):
    lrs = [0.021240374487011344, 0.00011829030549387373, 1e-05]
    for i, lr in enumerate(lrs):
        make_run(tmp_path, f"r{i}", lr=lr, overrides=[f"optim.lr={lr}"])
    rows = aggregate(collect_runs([tmp_path])[0], "optim.lr")
    md = render(rows, "md")
    assert [r[0] for r in _rows(md)[2:]] == ["1e-5", "0.000118", "0.0212"]
    assert "0.021240374487011344" not in md and _rows(md)[0][0] == "lr"
    # two values that agree to 3 digits get as many as it takes to tell them apart
    make_run(tmp_path, "r9", lr=0.021249, overrides=["optim.lr=0.021249"])
    rows = aggregate(collect_runs([tmp_path])[0], "optim.lr")
    assert [r[0] for r in _rows(render(rows, "md"))[2:]] == ["1e-5", "0.000118", "0.02124", "0.02125"]
    assert rows[2].label == "lr=0.02124" and rows[0].warnings == []


def test_readable_labels():
    assert metric_name("macro_f1") == "macro F1" and metric_name("top3_accuracy") == "top-3 accuracy"
    assert metric_name("ece") == "ECE" and metric_name("log_loss") == "log-loss"
    assert metric_name("weighted_precision") == "weighted precision"
    assert key_headers(["model.name", "optim.lr", "trainer.max_epochs", "seed"]) == ["model", "lr", "max epochs",
                                                                                      "seed"]
    assert key_headers(["model.dropout", "head.dropout"]) == ["model.dropout", "head.dropout"]  # ambiguous


# ----------------------------------------------------------------------------- the plot
@pytest.fixture
def lr_sweep(tmp_path):
    """lr 1e-3 x 3 seeds, lr 1e-2 x 2 seeds, lr 1e-1 x 1 seed; the same model (same params)."""
    root = tmp_path / "sweep"
    accs = {0.001: [0.80, 0.85, 0.90], 0.01: [0.70, 0.74], 0.1: [0.30]}
    for lr, values in accs.items():
        for seed, acc in enumerate(values):
            make_run(root, f"{lr}_{seed}", lr=lr, seed=seed, acc=acc, f1=acc - 0.1,
                     overrides=[f"optim.lr={lr}", f"seed={seed}"])
    return root, accs


def _bars(ax):
    """{x: (low, high)} of the error bars the axes draws."""
    from matplotlib.container import ErrorbarContainer

    out = {}
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer) and c.lines[2]:
            for (x0, y0), (_, y1) in c.lines[2][0].get_segments():
                out[round(float(x0), 6)] = (float(y0), float(y1))
    return out


@pytest.mark.parametrize("kind", ["ci", "std"])
def test_error_bars_are_the_interval_asked_for(lr_sweep, kind):
    root, accs = lr_sweep
    rows = aggregate(collect_runs([root])[0])
    fig = figure(rows, errorbar=kind, kind="bars")  # (optim.lr is numeric: auto would draw a curve)
    (ax,) = fig.axes
    bars = _bars(ax)
    assert sorted(bars) == [0, 1]  # categorical x (params equal); n=1 has no interval, so no bar
    for x, values in enumerate([accs[0.001], accs[0.01]]):
        n, mean = len(values), sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = T975[n - 1] * std / math.sqrt(n) if kind == "ci" else std
        assert bars[x] == pytest.approx((100 * (mean - half), 100 * (mean + half)))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == [{"ci": "mean ± 95% CI (t, n-1)", "std": "mean ± 1 std"}[kind], "single runs (seeds)"]
    # every run is a dot at its own value
    from matplotlib.collections import PathCollection

    dots = sorted(round(float(y), 6) for coll in ax.collections if isinstance(coll, PathCollection)
                  for _, y in coll.get_offsets())
    assert dots == sorted(round(100 * v, 6) for vs in accs.values() for v in vs)
    assert ax.get_ylabel() == "test accuracy (label) [%]" and ax.get_xlabel() == "lr"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001\nn=3", "0.01\nn=2", "0.1\nn=1"]
    assert not _bars(figure(rows, errorbar="none", kind="bars").axes[0])


def test_plot_panels_params_axis_and_sizes(sweep_params, tmp_path):
    rows = aggregate(collect_runs([sweep_params])[0], "model", "test/accuracy,test/macro_f1")
    fig = figure(rows, size="two")
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy (label) [%]", "test macro F1 (label) [%]"]
    assert fig.axes[0].get_xscale() == "log" and fig.axes[0].get_xlabel() == "trainable parameters (log scale)"
    assert sorted(_bars(fig.axes[0])) == [100.0]  # the cnn (100 params, 2 seeds); mlp has one run
    notes = [t.get_text() for t in fig.axes[0].texts]
    assert notes == ["cnn (n=2)", "mlp (n=1)"]
    assert tuple(fig.get_size_inches()) == (7.0, 3.2)
    assert tuple(figure(rows, size="one").get_size_inches()) == (3.5, 5.2)  # one column: panels stacked
    assert tuple(figure(rows, size="3x2").get_size_inches()) == (3.0, 2.0)


@pytest.fixture
def sweep_params(tmp_path):
    root = tmp_path / "p"
    make_run(root, "a", acc=0.8, f1=0.7)
    make_run(root, "b", seed=1, acc=0.9, f1=0.8)
    make_run(root, "c", model="mlp", acc=0.6, f1=0.5, trainable=5000)
    return root


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_files_png_pdf_svg(lr_sweep, tmp_path):
    root, _ = lr_sweep
    rows = aggregate(collect_runs([root])[0])
    paths = plot(rows, [tmp_path / "f.png", tmp_path / "f.pdf", tmp_path / "f.svg"], errorbar="std", size="one",
                 kind="bars")
    assert [p.name for p in paths] == ["f.png", "f.pdf", "f.svg"]
    assert _png_size(tmp_path / "f.png") == (1050, 780)  # 3.5 x 2.6 in at 300 dpi
    pdf = (tmp_path / "f.pdf").read_bytes()
    assert pdf.startswith(b"%PDF-") and b"/MediaBox [ 0 0 252 187.2 ]" in pdf  # 3.5 x 2.6 in
    assert b"/Subtype /CIDFontType2" in pdf and b"Type3" not in pdf  # fonttype 42: text stays editable
    svg = ET.parse(tmp_path / "f.svg").getroot()
    assert svg.get("width") == "252pt" and svg.get("height") == "187.2pt"
    texts = "".join(svg.itertext())
    assert "test accuracy (label) [%]" in texts and "mean ± 1 std" in texts and "0.001" in texts
    with pytest.raises(TlbenchError, match=r"\.png, \.pdf, \.svg"):
        plot(rows, tmp_path / "f.jpg")


def test_plot_from_the_command_line(lr_sweep, tmp_path, capsys):
    root, _ = lr_sweep
    out = tmp_path / "figs" / "lr"
    assert compare_main([str(root), "--plot", f"{out}.png,{out}.svg", "--errorbar", "std", "--size", "one",
                         "--plot-kind", "bars"]) == 0
    assert f"wrote {out}.png, {out}.svg (error bars: mean ± 1 std)" in capsys.readouterr().out
    assert _png_size(out.with_suffix(".png"))[0] == 1050
    assert "mean ± 1 std" in "".join(ET.parse(f"{out}.svg").getroot().itertext())
    for args, message in [(["--plot", "x.gif"], "must end in"), (["--plot", "x.png", "--size", "huge"], "--size"),
                          (["--plot", "x.png", "--errorbar", "sem"], "invalid choice: 'sem'")]:
        with pytest.raises(TlbenchError, match=re.escape(message)):
            compare_main([str(root), *args])
    assert not (tmp_path / "x.png").exists()
