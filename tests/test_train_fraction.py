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
    return build_data(DatasetConfig(name="sklearn_digits", **kw), _spec(), seed)


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
    full = build_data(DatasetConfig(**kw), _spec(), 0)
    part = build_data(DatasetConfig(**kw, train_fraction=0.5), _spec(), 0)
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
