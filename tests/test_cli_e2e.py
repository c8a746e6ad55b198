"""The real ``tlbench`` command, end to end, on the default experiment (shrunk to 2 epochs)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

EPOCHS = 2


def _tlbench(*args, cwd, timeout=300):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "tlbench.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    run_dir = tmp / "run"
    proc = _tlbench(f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={run_dir}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_prints_run_dir_and_tensorboard_command(default_run):
    run_dir, proc = default_run
    assert f"run directory: {run_dir}" in proc.stdout
    assert f"tensorboard --logdir {run_dir / 'tb'}" in proc.stdout


def test_run_directory_contract(default_run):
    run_dir, _ = default_run
    for rel in (".hydra/config.yaml", "config_hash", "results.json", "predictions/label.csv", "splits.json",
                "checkpoints/last.pt", "checkpoints/best.pt", "figures/confusion_label.png",
                "classification_report_label.txt", "train.log"):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "tb").glob("events.out.tfevents*"))
    assert not list(run_dir.rglob("*.tmp")), "a temporary checkpoint file was left behind"
    res = json.loads((run_dir / "results.json").read_text())
    assert res["config_hash"] == (run_dir / "config_hash").read_text().strip()
    for key in ("dataset_fingerprint", "params", "best_epoch", "epochs", "val", "test", "device", "versions"):
        assert key in res, key
    assert len(res["epochs"]) == EPOCHS
    assert res["params"]["trainable"] == res["params"]["total"] > 0
    assert set(res["versions"]) >= {"torch", "torchvision", "timm", "tlbench"}
    assert "epoch 2/2" in (run_dir / "train.log").read_text()


def test_accuracy_recomputes_from_predictions_and_targets_are_true_labels(default_run):
    from sklearn.datasets import load_digits

    run_dir, _ = default_run
    res = json.loads((run_dir / "results.json").read_text())
    with open(run_dir / "predictions" / "label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    index = np.array([int(r["index"]) for r in rows])
    target = np.array([int(r["target"]) for r in rows])
    pred = np.array([int(r["pred"]) for r in rows])
    probs = np.array([[float(r[f"prob_{k}"]) for k in range(10)] for r in rows])
    assert np.mean(target == pred) == pytest.approx(res["test"]["label"]["accuracy"], abs=1e-12)
    np.testing.assert_array_equal(target, load_digits().target[index])
    np.testing.assert_array_equal(pred, probs.argmax(1))
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    splits = json.loads((run_dir / "splits.json").read_text())
    assert sorted(index.tolist()) == sorted(splits["test"])
    assert not set(splits["train"]) & set(splits["test"]) and not set(splits["val"]) & set(splits["test"])
    assert len(splits["train"]) + len(splits["val"]) + len(splits["test"]) == 1797


def test_tensorboard_scalars_every_epoch(default_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = default_run
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("loss/train", "loss/val", "accuracy/train/label", "accuracy/val/label",
                "time/epoch_train_s", "time/epoch_val_s"):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, EPOCHS + 1))
    assert any(t.startswith("lr/") for t in tags)
    assert "train/batch" in acc.Tags()["images"]
    for tag in ("accuracy/val_best/label", "accuracy/test_best/label", "hparam/test_accuracy_label"):
        assert tag in tags, tag


def test_check_run_tool_agrees(default_run):
    tool = REPO.parent / "shared" / "tools" / "check_run.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/check_run.py is not here")
    run_dir, _ = default_run
    out = subprocess.run([sys.executable, str(tool), str(run_dir), "--truth", "sklearn_digits"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_list_and_help(tmp_path):
    out = _tlbench("list", "models", cwd=tmp_path)
    assert out.returncode == 0 and "cnn" in out.stdout and "mlp" in out.stdout
    out = _tlbench("--help", cwd=tmp_path)
    # the header's subcommands and Hydra's generated groups (every option of dataset and model)
    assert out.returncode == 0 and "tlbench eval RUN_DIR" in out.stdout
    assert "dataset: chest_xray, cifar10, emnist" in out.stdout and "model: cait_s24, cnn" in out.stdout
    out = _tlbench("--cfg", "job", "model=mlp", cwd=tmp_path)
    assert out.returncode == 0 and "name: mlp" in out.stdout


def test_bad_override_exits_2_without_traceback(tmp_path):
    out = _tlbench("model=resnet9000", cwd=tmp_path)
    assert out.returncode == 2
    assert "resnet9000" in out.stderr and "cnn" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "outputs").exists()


def test_sigterm_saves_last_checkpoint(tmp_path):
    """A real SIGTERM mid-run exits 143 and leaves a loadable last.pt of the last full epoch."""
    import signal
    import time

    import torch

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "tlbench.cli", "trainer.max_epochs=400", "model.image_size=16",
            "trainer.progress=false", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run_dir / "train.log"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "epoch 2/400" in log.read_text()):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "trainer.resume=" in err
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert 2 <= ckpt["epoch"] < 400
    assert not (run_dir / "results.json").exists()


@pytest.mark.parametrize("sub, words", [("eval", ("split=test|val|train|all", "example: tlbench eval")),
                                         ("plan", ("--json", "example: tlbench plan")),
                                         ("list", ("WHAT", "example: tlbench list")),
                                         ("download", ("model=NAME", "example: tlbench download"))])
def test_subcommand_help(sub, words, capsys):
    from tlbench.cli import main

    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words)


def test_list_accepts_singular_and_plural_with_whole_descriptions(capsys):
    from tlbench.cli import main

    assert main(["list", "dataset"]) == 0
    singular = capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    assert capsys.readouterr().out == singular and "cifar10" in singular
    assert main(["list", "experiment"]) == 0 and main(["list", "experiments"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("chest_xray_fe_vs_ft"))
    assert line.rstrip().endswith("training from scratch.")  # the whole first paragraph, not one line of it
