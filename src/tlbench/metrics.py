"""Metrics from (targets, predictions, probabilities) via scikit-learn.

Everything here is a pure function of what ``predictions/<task>.csv`` holds, so every
number in ``results.json`` can be recomputed from that file.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def compute_metrics(targets, preds, probs, class_names: list[str], topk=(1, 3)) -> dict:
    """Accuracy, top-k, macro/weighted P/R/F1, per-class P/R/F1/support, log-loss, confusion.

    For binary tasks also sensitivity/specificity (class 1 positive) and ROC-AUC/PR-AUC.
    """
    y, p, prob = np.asarray(targets), np.asarray(preds), np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    labels = list(range(k))
    out: dict = {"n": int(len(y)), "accuracy": float(np.mean(y == p)) if len(y) else 0.0}
    for kk in topk:
        if 1 < kk < k:
            top = np.argsort(-prob, axis=1)[:, :kk]
            out[f"top{kk}_accuracy"] = float(np.mean([yy in row for yy, row in zip(y, top)]))
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        out[f"{avg}_precision"], out[f"{avg}_recall"], out[f"{avg}_f1"] = float(pr), float(rc), float(f1)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)
    out["per_class"] = {
        name: {"precision": float(pr[i]), "recall": float(rc[i]), "f1": float(f1[i]), "support": int(sup[i])}
        for i, name in enumerate(class_names)
    }
    clipped = np.clip(prob, 1e-15, 1.0)
    out["log_loss"] = float(-np.mean(np.log(clipped[np.arange(len(y)), y]))) if len(y) else 0.0
    out["confusion_matrix"] = skm.confusion_matrix(y, p, labels=labels).tolist()
    if k == 2:
        out.update(_binary(y, p, prob[:, 1]))
    return out


def _binary(y, p, score) -> dict:
    tp = int(np.sum((y == 1) & (p == 1)))
    tn = int(np.sum((y == 0) & (p == 0)))
    fp = int(np.sum((y == 0) & (p == 1)))
    fn = int(np.sum((y == 1) & (p == 0)))
    out = {
        "sensitivity": tp / (tp + fn) if tp + fn else 0.0,
        "specificity": tn / (tn + fp) if tn + fp else 0.0,
    }
    if len(np.unique(y)) == 2:
        out["roc_auc"] = float(skm.roc_auc_score(y, score))
        out["pr_auc"] = float(skm.average_precision_score(y, score))
    return out


def classification_report(targets, preds, class_names: list[str]) -> str:
    return skm.classification_report(
        targets, preds, labels=list(range(len(class_names))), target_names=class_names, digits=4, zero_division=0
    )
