"""What a run writes for people: a sweep's jobs never show their test metrics where the search could be steered by them
(issue #16): TensorBoard gets validation only; the test numbers stay in results.json and the
predictions files for the final table."""

from __future__ import annotations

import json

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


def test_checkpoint_selection_on_validation_macro_f1(tmp_path):
    """trainer.monitor=val/macro_f1: best.pt is the epoch with the highest validation macro F1
    (recomputed here from the per-epoch records), in TensorBoard and metrics.csv too."""
    import csv

    import torch

    from tlbench.run import train

    cfg = compose_cfg("trainer.max_epochs=4", "trainer.batch_size=256", "trainer.progress=false",
                      "trainer.monitor=val/macro_f1", "optim.lr=0.02")
    res = train(cfg, tmp_path / "r")
    f1 = [e["val"]["macro_f1"]["label"] for e in res["epochs"]]
    best = max(range(len(f1)), key=lambda i: (f1[i], -i)) + 1
    assert res["best_epoch"] == best and res["monitor"] == "val/macro_f1"
    assert torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)["epoch"] == best
    assert res["val"]["label"]["macro_f1"] == pytest.approx(f1[best - 1], rel=1e-9)
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [float(r["val_macro_f1_label"]) for r in rows] == pytest.approx(f1)
    assert any(t.startswith("macro_f1/val") for t in _tags(tmp_path / "r"))


def test_validation_ece_per_epoch_matches_the_final_report(tmp_path):
    """The validation ECE of every epoch is in the record, metrics.csv and TensorBoard (ece/val/<task>);
    the best epoch's value is the one results.json reports for val (same model, same bins)."""
    import csv

    from tlbench.run import train

    cfg = compose_cfg("trainer.max_epochs=3", "trainer.batch_size=256", "trainer.progress=false",
                      "eval.calibration_bins=7", "optim.lr=0.02")
    res = train(cfg, tmp_path / "r")
    ece = [e["val"]["ece"]["label"] for e in res["epochs"]]
    assert all(0.0 < v < 1.0 for v in ece) and len(set(ece)) == 3
    assert res["val"]["label"]["ece"] == pytest.approx(ece[res["best_epoch"] - 1], abs=1e-6)
    rows = list(csv.DictReader(open(tmp_path / "r" / "metrics.csv")))
    assert [float(r["val_ece_label"]) for r in rows] == pytest.approx(ece, rel=1e-6)
    assert "ece/val/label" in _tags(tmp_path / "r")


def test_monitor_value_and_mode_follow_the_metric():
    """An imbalanced validation set where accuracy and macro F1 disagree: the monitor reads the
    metric it names, and every monitor but the loss is higher-is-better."""
    import numpy as np

    from tlbench.engine import EpochResult
    from tlbench.metrics import improved, monitor_value

    def epoch(preds):
        y = np.array([0] * 8 + [1, 2])
        return EpochResult(loss=1.0, task_loss={"label": 1.0}, accuracy={"label": float((np.array(preds) == y).mean())},
                           n=10, seconds=0.0, collected={"label": {"targets": y, "preds": np.array(preds)}})

    majority = epoch([0] * 10)                      # accuracy 0.8, macro F1 0.30
    balanced = epoch([0] * 5 + [1, 2, 1, 1, 2])     # accuracy 0.7, macro F1 0.65
    assert monitor_value("val/accuracy", majority) > monitor_value("val/accuracy", balanced)
    assert monitor_value("val/macro_f1", balanced) > monitor_value("val/macro_f1", majority)
    assert improved("val/macro_f1", 0.5, 0.4) and not improved("val/macro_f1", 0.3, 0.4)
    assert improved("val/loss", 0.3, 0.4) and not improved("val/loss", 0.5, 0.4)


def test_training_loss_per_step_in_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tlbench.run import train

    cfg = compose_cfg("trainer.max_epochs=2", "trainer.batch_size=64", "trainer.progress=false",
                      "trainer.log_every_n_steps=5")
    res = train(cfg, tmp_path / "r")
    acc = EventAccumulator(str(tmp_path / "r" / "tb"))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("loss/train_step")]
    total = sum(-(-e["train"]["n"] // 64) for e in res["epochs"])
    assert steps == list(range(5, total + 1, 5))
    assert all(v.value > 0 for v in acc.Scalars("loss/train_step"))


def test_a_limited_evaluation_says_so(cli, capsys):
    """trainer.limit_eval_batches (a smoke setting) scores the first items of val and test only:
    results.json eval_limit says how many of how many, the summary line and the log say it, and
    the metrics are those of exactly those items; without it eval_limit is null."""
    code, rd = cli("trainer.max_epochs=1", "trainer.batch_size=64", "trainer.limit_eval_batches=1")
    assert code == 0
    r = json.loads((rd / "results.json").read_text())
    splits = json.loads((rd / "splits.json").read_text())
    assert r["eval_limit"] == {"trainer.limit_eval_batches": 1, "val": {"n": 64, "of": len(splits["val"])},
                               "test": {"n": 64, "of": len(splits["test"])}}
    assert r["test"]["label"]["n"] == 64
    out = capsys.readouterr().out
    assert f"on 64 of {len(splits['test'])} test items (trainer.limit_eval_batches=1)" in out
    assert "limit_eval_batches=1: validation and the final test score only the first 64" in (rd / "train.log").read_text()
    code, rd2 = cli("trainer.max_epochs=1", run_dir=rd.parent / "whole")
    assert code == 0 and json.loads((rd2 / "results.json").read_text())["eval_limit"] is None
