"""Objectives: what the loop minimizes and how it scores an epoch.

An objective has ``losses(out, x, y) -> {task: loss}`` (under autocast, before the step) and
``measure(out, x, y, collect) -> ({task: hits}, {task: {name: per-item tensor}} or None)`` (after
it, on detached outputs; hits / items = the epoch's ``accuracy``), and ``scores`` (whether hits
mean anything). :class:`Classification` is the default; ``recon.Reconstruction`` compares a
model's output with its input.

Classification: the loss is the sum over tasks of cross-entropy on logits (never on
probabilities). A distilled backbone returns stacked (cls, dist) logits while training; both
heads learn the same label and their losses are averaged; in evaluation their logits are averaged.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def task_loss(logits: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor]) -> torch.Tensor:
    if logits.dim() == 3:  # distilled pair (cls, dist): both heads learn the label
        return sum(F.cross_entropy(l, target, weight=weight) for l in logits) / logits.shape[0]
    return F.cross_entropy(logits, target, weight=weight)


def eval_logits(logits: torch.Tensor) -> torch.Tensor:
    return logits.mean(0) if logits.dim() == 3 else logits


class Classification:
    """The default objective: per task, cross-entropy of the logits against the label; scored by
    the number of correct argmax predictions; collected as targets, predictions, probabilities."""

    scores = True  # hits per task: the epoch's accuracy

    def __init__(self, class_weights: Optional[dict[str, torch.Tensor]] = None):
        self.class_weights = class_weights or {}

    def losses(self, out: dict, x: torch.Tensor, y: dict) -> dict:
        return {t: task_loss(out[t].float(), y[t], self.class_weights.get(t)) for t in out}

    def measure(self, out: dict, x: torch.Tensor, y: dict, collect: bool):
        logits = {t: eval_logits(v.detach().float()) for t, v in out.items()}
        preds = {t: v.argmax(1) for t, v in logits.items()}
        hits = {t: (preds[t] == y[t]).sum() for t in out}
        items = ({t: {"targets": y[t], "preds": preds[t], "probs": logits[t].softmax(1)} for t in out}
                 if collect else None)
        return hits, items
