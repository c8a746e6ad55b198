"""Metric functions against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from tlbench.metrics import compute_metrics


def test_multiclass_by_hand():
    y = [0, 0, 1, 1, 2, 2]
    p = [0, 1, 1, 1, 2, 0]
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.1, .8, .1], [.2, .7, .1], [.1, .1, .8], [.5, .2, .3]])
    m = compute_metrics(y, p, probs, ["a", "b", "c"], topk=(1, 2))
    assert m["accuracy"] == pytest.approx(4 / 6)
    # class a: tp=1 fp=1 fn=1 -> P=R=F1=.5 ; b: tp=2 fp=1 fn=0 -> P=2/3 R=1 ; c: tp=1 fp=0 fn=1 -> P=1 R=.5
    assert m["per_class"]["a"] == {"precision": .5, "recall": .5, "f1": .5, "support": 2}
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["macro_recall"] == pytest.approx((.5 + 1 + .5) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # top-2: every target is within the two most probable classes except item 5 (y=2: .5,.3 -> yes)
    assert m["top2_accuracy"] == pytest.approx(6 / 6)
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([.8, .3, .8, .7, .8, .3])))


def test_binary_sensitivity_specificity():
    y = [1, 1, 1, 0, 0]
    p = [1, 0, 1, 0, 1]
    probs = np.array([[.2, .8], [.6, .4], [.1, .9], [.7, .3], [.4, .6]])
    m = compute_metrics(y, p, probs, ["neg", "pos"])
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["roc_auc"] == pytest.approx(5 / 6)  # pairs (pos,neg) ranked right: 5 of 6


def test_positive_class_choice_swaps_sensitivity_and_specificity():
    y = [1, 1, 1, 0, 0]
    p = [1, 0, 1, 0, 1]
    probs = np.array([[.2, .8], [.6, .4], [.1, .9], [.7, .3], [.4, .6]])
    m = compute_metrics(y, p, probs, ["neg", "pos"], positive=0)
    assert m["positive_class"] == "neg"
    assert m["sensitivity"] == pytest.approx(1 / 2) and m["specificity"] == pytest.approx(2 / 3)


def test_expected_calibration_error_by_hand():
    from tlbench.metrics import expected_calibration_error

    y = np.array([0, 0, 1, 1])
    prob = np.array([[.9, .1], [.9, .1], [.6, .4], [.3, .7]])
    # 2 bins: (0,.5] empty; (.5,1]: conf [.9,.9,.6,.7] mean .775, correct [1,1,0,1] -> .75
    assert expected_calibration_error(y, prob, bins=2) == pytest.approx(abs(.75 - .775))


def test_bootstrap_ci_brackets_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    p = np.where(rng.random(200) < .8, y, (y + 1) % 3)
    probs = np.eye(3)[p]
    a = compute_metrics(y, p, probs, ["a", "b", "c"], bootstrap=300)
    b = compute_metrics(y, p, probs, ["a", "b", "c"], bootstrap=300)
    lo, hi = a["bootstrap_ci95"]["accuracy"]
    assert lo < a["accuracy"] < hi and hi - lo < 0.2
    assert a["bootstrap_ci95"] == b["bootstrap_ci95"]
