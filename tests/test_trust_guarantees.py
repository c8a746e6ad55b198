"""Trust tests for guarantees of the README and docs/ that had no test of their own (see
docs/guarantees.md): splits disjoint, complete, stratified and independent of the training
seed and of any global RNG; official test splits used as they are; a frozen backbone run as
in inference (no dropout) even when its features are not cached; balanced class weights
reaching the loss."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # fixtures_data / conftest, whatever pytest's import mode

import fixtures_data as fx  # noqa: E402
from conftest import results  # noqa: E402


def _spec():
    from tlbench.config import ModelConfig
    from tlbench.models.scratch import scratch_spec

    return scratch_spec(ModelConfig(name="cnn", image_size=8))


def _bundle(rng_seed: int, **kw):
    """build_data with the global python/numpy/torch RNGs in a state of their own."""
    from tlbench.config import DatasetConfig
    from tlbench.data import build_data

    random.seed(rng_seed)
    np.random.seed(rng_seed)
    torch.manual_seed(rng_seed)
    return build_data(DatasetConfig(**kw), _spec())


def _check_partition(splits: dict, n: int) -> None:
    parts = {k: set(splits[k]) for k in ("train", "val", "test")}
    assert all(len(parts[k]) == len(splits[k]) > 0 for k in parts), "a split is empty or repeats an item"
    assert not (parts["train"] & parts["val"]), "train and val overlap"
    assert not (parts["train"] & parts["test"]), "train and test overlap"
    assert not (parts["val"] & parts["test"]), "val and test overlap"
    assert parts["train"] | parts["val"] | parts["test"] <= set(range(n))


def test_splits_are_disjoint_complete_stratified_and_depend_on_split_seed_only():
    """Splits: train/val/test pairwise disjoint and together every item; stratified; the same
    whatever the global RNG state (so whatever ``seed``), another ``dataset.split_seed`` gives
    another split; each split's labels are the source's labels of its items."""
    a = _bundle(0, name="sklearn_digits")
    b = _bundle(12345, name="sklearn_digits")
    assert a.splits == b.splits
    n = len(a.source)
    _check_partition(a.splits, n)
    assert sorted(a.splits["train"] + a.splits["val"] + a.splits["test"]) == list(range(n))
    assert abs(len(a.splits["test"]) - 0.15 * n) <= 1 and abs(len(a.splits["val"]) - 0.15 * n) <= 1
    labels = a.source.labels["label"]
    share = np.bincount(labels, minlength=10) / n
    for name in ("train", "val", "test"):
        counts = np.bincount(labels[a.splits[name]], minlength=10)
        assert np.all(np.abs(counts - share * len(a.splits[name])) <= 1), f"{name} is not stratified: {counts}"
        ds = getattr(a, name)
        assert list(ds.indices) == a.splits[name]
        np.testing.assert_array_equal(ds.labels["label"].numpy(), labels[a.splits[name]])
    c = _bundle(0, name="sklearn_digits", split_seed=1)
    assert c.splits["test"] != a.splits["test"]
    _check_partition(c.splits, n)


def test_official_test_split_is_used_as_it_is(tmp_path):
    """A format's own test split is the test split, nothing else, and no official test item
    reaches train or val; also with dataset.limit_per_class (applied to each part apart)."""
    root = tmp_path / "xray"
    fx.write_chest_xray(root, train={"Covid": 8, "Normal": 8, "Viral_Pneumonia": 8},
                        test={"Covid": 3, "Normal": 2, "Viral_Pneumonia": 2})
    for limit in (None, 4):
        bundle = _bundle(limit or 0, name="chest_xray", root=str(root), val_fraction=0.25, limit_per_class=limit)
        rel = bundle.source.relpaths
        official = [i for i, r in enumerate(rel) if r.startswith("test/")]
        _check_partition(bundle.splits, len(rel))
        if limit is None:
            assert bundle.splits["test"] == official
        else:
            assert set(bundle.splits["test"]) <= set(official) and len(bundle.splits["test"]) == 3 + 2 + 2
            assert len(bundle.splits["train"]) + len(bundle.splits["val"]) == 3 * 4
        assert not any(rel[i].startswith("test/") for i in bundle.splits["train"] + bundle.splits["val"])


def test_frozen_backbone_runs_without_dropout_when_features_are_not_cached(cli, tmp_path):
    """A frozen backbone is always run in eval mode (no dropout, BN fixed): with backbone dropout
    (model.dropout=0.5) a linear probe trained on the images gives the same run as the one
    trained on features computed once in inference mode."""
    over = ("freeze=linear_probe", "model.dropout=0.5", "trainer.max_epochs=2", "trainer.batch_size=128")
    code_a, a = cli(*over, run_dir=tmp_path / "cached")
    code_b, b = cli(*over, "trainer.cache_features=false", run_dir=tmp_path / "images")
    assert code_a == code_b == 0
    assert "computed once" in (a / "train.log").read_text()
    assert "computed once" not in (b / "train.log").read_text()
    ra, rb = results(a), results(b)
    for ea, eb in zip(ra["epochs"], rb["epochs"], strict=True):
        assert ea["train"]["loss"] == pytest.approx(eb["train"]["loss"], abs=1e-5)
        assert ea["val"]["loss"] == pytest.approx(eb["val"]["loss"], abs=1e-5)
    assert ra["test"]["label"]["loss"] == pytest.approx(rb["test"]["label"]["loss"], abs=1e-5)


def test_balanced_class_weights_reach_the_loss(cli, tmp_path, monkeypatch):
    """dataset.class_weights=balanced: every cross-entropy of the run is weighted per class by
    n_train / (K * n_train_of_class), from the training split's counts in results.json."""
    import tlbench.objectives as objectives

    seen = []
    real = objectives.task_loss

    def recording(logits, target, weight):
        seen.append(None if weight is None else weight.detach().cpu().clone())
        return real(logits, target, weight)

    monkeypatch.setattr(objectives, "task_loss", recording)
    root = tmp_path / "xray"
    fx.write_chest_xray(root, train={"Covid": 12, "Normal": 4, "Viral_Pneumonia": 4},
                        test={"Covid": 2, "Normal": 2, "Viral_Pneumonia": 2})
    code, run = cli("dataset=chest_xray", f"dataset.root={root}", "dataset.val_fraction=0.25",
                    "dataset.class_weights=balanced", "model=cnn", "trainer=smoke", "model.channels=[8,16]")
    assert code == 0
    counts = results(run)["class_counts"]["train"]["label"]
    n = np.array([counts[c] for c in ("Covid", "Normal", "Viral_Pneumonia")], dtype=float)
    want = torch.tensor(n.sum() / (len(n) * n), dtype=torch.float32)
    assert seen and all(w is not None and torch.allclose(w, want) for w in seen), (seen[:2], want)
    # and the run says which of its losses are weighted (the epochs') and which are not (results.json's)
    assert "every epoch's loss (train, val and a monitored val/loss) is the class-weighted" in (
        run / "train.log").read_text()
