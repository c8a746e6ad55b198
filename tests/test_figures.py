"""``figures/`` and the console (#16): what the confusion matrix, reliability diagram and
misclassified grid show, checked against results.json and the predictions file of a real run;
``tlbench eval``'s summary lines; a sweep trial's summary never shows test metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tlbench import tracking
from tlbench.evaluate import evaluate_run, run_summary_lines, summary_lines
from tlbench.figures import confusion_figure, misclassified, reliability_figure

PNG = b"\x89PNG\r\n\x1a\n"


def _texts(fig) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _ece(y, prob, bins):
    """Expected calibration error, written out here independently of tlbench.metrics."""
    conf, pred = prob.max(1), prob.argmax(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.sum() / len(y) * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return total


def _bin_counts(prob, bins):
    conf = prob.max(1)
    return [int(((conf > b / bins) & (conf <= (b + 1) / bins)).sum()) for b in range(bins)]


# ----------------------------------------------------------------------------- pure figures
def test_confusion_cells_hold_counts_and_row_percentages():
    cm = [[3, 1, 0], [0, 4, 0], [2, 2, 4]]
    fig = confusion_figure(cm, ["cat", "dog", "eel"], "label (test)")
    assert _texts(fig) == ["3\n75.0%", "1\n25.0%", "0", "0", "4\n100%", "0", "2\n25.0%", "2\n25.0%", "4\n50.0%"]
    (ax, cbar) = fig.axes
    assert ax.get_title() == "label (test): n=16, accuracy 68.8%\n(cells: count and % of the true class)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted", "true")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "eel"]
    shade = np.asarray(ax.images[0].get_array())  # the colour is the row share, not the count
    assert shade[2].tolist() == pytest.approx([0.25, 0.25, 0.5]) and shade[1].tolist() == pytest.approx([0, 1, 0])
    assert cbar.get_ylabel() == "share of the true class (row)"


def test_reliability_title_has_the_ece_and_bins_their_counts():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    prob = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(4, p=row) for row in prob])  # roughly calibrated: gaps of both signs
    fig = reliability_figure(y, prob, 8, "label (test)")
    top, bottom = fig.axes
    assert top.get_title() == f"label (test): ECE {_ece(y, prob, 8):.4f} (8 bins, n=200)"
    counts = _bin_counts(prob, 8)
    assert [int(t.get_text()) for t in bottom.texts] == [c for c in counts if c]
    assert [round(p.get_height()) for p in bottom.patches] == counts
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["perfect calibration", "accuracy",
                                                                    "gap to the diagonal"]


def test_misclassified_order_most_confident_first():
    y = np.array([0, 1, 2, 0, 1])
    p = np.array([1, 1, 0, 2, 0])
    prob = np.array([[.2, .7, .1], [0, 1, 0], [.6, .1, .3], [.1, .1, .8], [.7, .3, 0]])
    assert misclassified(y, p, prob) == [3, 0, 4, 2]  # p(pred) .8, .7, .7 (in order), .6
    assert misclassified(y, p, prob, limit=2) == [3, 0]
    assert misclassified(y, y, prob) == []


# ----------------------------------------------------------------------------- a real run
@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One tiny real run (1 epoch on the embedded digits); every figure it writes is captured."""
    from tlbench.cli import main

    rd = tmp_path_factory.mktemp("fig") / "run"
    captured = {}
    original = tracking.save_figure

    def save(fig, path):
        captured[Path(path).name] = fig
        return original(fig, path)

    mp = pytest.MonkeyPatch()
    mp.setattr(tracking, "save_figure", save)
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        code = main(["trainer.max_epochs=1", "trainer.progress=false", f"hydra.run.dir={rd}"])
    finally:
        mp.undo()
    assert code == 0
    return rd, captured


def _predictions(path: Path):
    rows = list(csv.DictReader(path.open()))
    k = sum(1 for c in rows[0] if c.startswith("prob_"))
    prob = np.array([[float(r[f"prob_{j}"]) for j in range(k)] for r in rows])
    return rows, np.array([int(r["target"]) for r in rows]), np.array([int(r["pred"]) for r in rows]), prob


def test_run_figures_show_what_results_json_says(digits_run):
    rd, figs = digits_run
    res = json.loads((rd / "results.json").read_text())["test"]["label"]
    for name in ("confusion_label.png", "reliability_label.png", "misclassified_label.png"):
        assert (rd / "figures" / name).read_bytes()[:8] == PNG and name in figs
    # confusion: every cell's count and row percentage, from results.json's matrix
    cm = np.array(res["confusion_matrix"])
    texts = _texts(figs["confusion_label.png"])
    assert len(texts) == cm.size
    for (i, j), text in zip(np.ndindex(*cm.shape), texts):
        count, _, pct = text.partition("\n")
        assert int(count) == cm[i, j]
        assert (pct == "") == (cm[i, j] == 0)
        if cm[i, j]:
            assert float(pct.rstrip("%")) == pytest.approx(100 * cm[i, j] / cm[i].sum(), abs=0.05)
    assert f"n={cm.sum()}, accuracy {100 * res['accuracy']:.1f}%" in figs["confusion_label.png"].axes[0].get_title()
    # reliability: the ECE of results.json (and recomputed from the predictions file), the bin counts
    rows, y, p, prob = _predictions(rd / "predictions" / "label.csv")
    top, bottom = figs["reliability_label.png"].axes
    assert top.get_title() == f"label (test): ECE {res['ece']:.4f} (15 bins, n={res['n']})"
    assert _ece(y, prob, 15) == pytest.approx(res["ece"], abs=1e-6)
    counts = [int(t.get_text()) for t in bottom.texts]
    assert counts == [c for c in _bin_counts(prob, 15) if c] and sum(counts) == res["n"]


def test_misclassified_grid_labels_match_the_predictions_file(digits_run):
    rd, figs = digits_run
    rows, y, p, prob = _predictions(rd / "predictions" / "label.csv")
    wrong = [r for r in rows if r["target"] != r["pred"]]
    assert wrong, "a 1-epoch run should make mistakes"
    fig = figs["misclassified_label.png"]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == min(32, len(wrong))
    assert fig._suptitle.get_text().startswith(f"label (test): {len(titles)} of {len(wrong)} misclassified images")
    by_index = {r["index"]: r for r in wrong}
    shown_p = []
    for t in titles:  # "#<dataset index>: <true> → <pred>\np=<prob of pred>"
        head, _, prob_text = t.partition("\np=")
        idx, _, pair = head[1:].partition(": ")
        r = by_index[idx]
        assert pair == f"{r['target_name']} → {r['pred_name']}"
        assert float(prob_text) == pytest.approx(float(r[f"prob_{r['pred']}"]), abs=0.005)
        shown_p.append(float(r[f"prob_{r['pred']}"]))
    assert shown_p == sorted(shown_p, reverse=True)  # most confident first
    left_out = [float(r[f"prob_{r['pred']}"]) for i, r in by_index.items() if f"#{i}: " not in "".join(titles)]
    assert all(q <= min(shown_p) + 1e-7 for q in left_out)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == len(titles) and all(0 <= float(a.min()) and float(a.max()) <= 1 for a in images)


# ----------------------------------------------------------------------------- console
def test_eval_summary_lines(digits_run, monkeypatch):
    rd, _ = digits_run
    figs, original = {}, tracking.save_figure

    def save(fig, path):
        figs[Path(path).name] = fig
        return original(fig, path)

    monkeypatch.setattr(tracking, "save_figure", save)
    out = evaluate_run(rd, "val", {}, "v")
    res = json.loads((out / "results.json").read_text())
    m = res["val"]["label"]
    lines = summary_lines(out)
    assert lines[0] == (f"val metrics of {rd} (best checkpoint, epoch {res['checkpoint_epoch']}) on "
                        f"sklearn_digits: {m['n']} items")
    assert lines[1] == (f"  label: accuracy {m['accuracy']:.4f}, top-3 accuracy {m['top3_accuracy']:.4f}, "
                        f"macro F1 {m['macro_f1']:.4f}, weighted F1 {m['weighted_f1']:.4f}, "
                        f"log-loss {m['log_loss']:.4f}, ECE {m['ece']:.4f}")
    files = lines[2].removeprefix("  files: ").split(", ")
    assert {"results.json", "predictions/label.csv", "figures/confusion_label.png",
            "figures/reliability_label.png", "classification_report_label.txt"} <= set(files)
    assert all((out / f).is_file() for f in files)
    # the figures say which split they show
    assert figs["confusion_label.png"].axes[0].get_title().startswith(f"label (val): n={m['n']}")
    assert figs["reliability_label.png"].axes[0].get_title() == f"label (val): ECE {m['ece']:.4f} (15 bins, n={m['n']})"


def test_eval_summary_with_bootstrap_and_binary(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({
        "run_dir": "/r", "split": "test", "dataset": {"name": "chest_xray", "root": "/data/x"},
        "checkpoint_epoch": 7, "test": {"label": {
            "n": 44, "accuracy": 0.75, "macro_f1": 0.7, "log_loss": 0.5, "ece": 0.1, "sensitivity": 0.8,
            "specificity": 0.7, "roc_auc": 0.81, "pr_auc": 0.79, "per_class": {}, "confusion_matrix": [[1]],
            "bootstrap_ci95": {"accuracy": [0.61, 0.86], "macro_f1": [0.55, 0.8], "resamples": 1000}}}}))
    lines = summary_lines(tmp_path)
    assert lines[0] == "test metrics of /r (best checkpoint, epoch 7) on chest_xray at /data/x: 44 items"
    assert lines[1] == ("  label: accuracy 0.7500 (95% CI 0.6100-0.8600), macro F1 0.7000 (95% CI 0.5500-0.8000), "
                        "log-loss 0.5000, ECE 0.1000, sensitivity 0.8000, specificity 0.7000, ROC-AUC 0.8100, "
                        "PR-AUC 0.7900")
    assert lines[2] == "  files: results.json"


def test_sweep_trials_print_val_never_test(tmp_path):
    results = {"params": {"trainable": 10, "total": 20}, "best_epoch": 3,
               "val": {"label": {"accuracy": 0.91234}}, "test": {"label": {"accuracy": 0.87654}}}
    lines = run_summary_lines("/s/4", results, sweeping=True, sweep_dir="/s")
    text = "\n".join(lines)
    assert "0.8765" not in text and "test accuracy" not in text
    assert lines[0] == "val accuracy: label 0.9123 (the sweep's objective; best epoch 3, 10 of 20 parameters trained)"
    assert lines[2] == "test metrics are kept for the end of the sweep: tlbench compare /s"
    assert len(lines) == 3  # no tb/ in the sweep: no TensorBoard line
    (tmp_path / "s" / "tb").mkdir(parents=True)
    lines = run_summary_lines(tmp_path / "s" / "4", results, sweeping=True, sweep_dir=tmp_path / "s")
    assert lines[3] == f"runs by their overrides: tensorboard --logdir {tmp_path / 's' / 'tb'}"
    single = run_summary_lines(tmp_path / "r", results)
    assert single[0] == "test accuracy: label 0.8765 (best epoch 3, 10 of 20 parameters trained)"
    assert len(single) == 2  # logger without tensorboard: no tb/ to inspect
    (tmp_path / "r" / "tb").mkdir(parents=True)
    single = run_summary_lines(tmp_path / "r", results)
    assert single[2] == f"inspect with:  tensorboard --logdir {tmp_path / 'r' / 'tb'}"
