"""What a run writes for people: a sweep's jobs never show their test metrics where the search could be steered by them
(issue #16): TensorBoard gets validation only; the test numbers stay in results.json and the
predictions files for the final table."""

from __future__ import annotations

import pytest

from conftest import compose_cfg


def _tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (run_dir / "tb").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        for kind in ("scalars", "images", "tensors"):
            tags |= set(acc.Tags().get(kind, []))
    return tags


@pytest.mark.parametrize("sweeping", [False, True])
def test_sweep_jobs_keep_test_out_of_tensorboard(tmp_path, sweeping):
    from tlbench.run import train

    cfg = compose_cfg("trainer.max_epochs=1", "trainer.batch_size=256", "trainer.progress=false")
    res = train(cfg, tmp_path / "r", sweeping=sweeping)
    assert res["test"]["label"]["accuracy"] > 0  # the numbers are there for the final table
    tags = _tags(tmp_path / "r")
    assert any("val" in t for t in tags)
    test_tags = {t for t in tags if "test" in t}
    assert bool(test_tags) is not sweeping, test_tags


def test_every_run_writes_a_csv_of_its_epochs(tmp_path):
    import csv

    from tlbench.run import train

    cfg = compose_cfg("trainer.max_epochs=3", "trainer.batch_size=256", "trainer.progress=false")
    res = train(cfg, tmp_path / "r")
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for r, e in zip(rows, res["epochs"]):
        assert float(r["train_loss"]) == pytest.approx(e["train"]["loss"], rel=1e-7)
        assert float(r["val_accuracy_label"]) == pytest.approx(e["val"]["accuracy"]["label"], rel=1e-7)
        assert float(r["lr_backbone"]) == e["lr"]["backbone"]
