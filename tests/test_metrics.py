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
