"""The real ``tlbench`` command, end to end, on the default experiment (shrunk to 2 epochs).

In-process (``cli.main``), as the console script calls it; only the SIGTERM test needs a real
process (``python -m tlbench``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO
from tlbench.cli import main

EPOCHS = 2


def _tlbench(*args) -> tuple[int, str, str]:
    """``tlbench ARGS`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # Hydra's own flags and errors raised inside the Hydra task
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    code, out, err = _tlbench(f"trainer.max_epochs={EPOCHS}", f"hydra.run.dir={run_dir}")
    assert code == 0, err[-3000:]
    return run_dir, out


def test_prints_run_dir_and_tensorboard_command(default_run):
    run_dir, out = default_run
    assert f"run directory: {run_dir}" in out
    assert f"tensorboard --logdir {run_dir / 'tb'}" in out


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


def test_list_prints_the_options_of_a_group():
    code, out, _ = _tlbench("list", "models")
    assert code == 0 and "cnn" in out and "mlp" in out


def test_help_lists_subcommands_and_every_option_of_the_groups():
    code, out, _ = _tlbench("--help")
    assert code == 0 and "tlbench eval RUN_DIR" in out
    assert "dataset: chest_xray, cifar10, emnist" in out and "model: cae, cait_s24, cnn" in out
    assert "trainer: default, smoke" in out and "experiment: chest_xray_fe_vs_ft" in out


def test_cfg_job_shows_every_typed_key():
    code, out, _ = _tlbench("--cfg", "job", "model=mlp")
    assert code == 0 and "name: mlp" in out
    assert "truncate: null" in out  # not in conf/model/mlp.yaml: the schema brings every key


def test_bad_override_exits_2_without_traceback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _tlbench("model=resnet9000")
    assert code == 2
    assert "resnet9000" in err and "cnn" in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists()


def test_sigterm_saves_last_checkpoint(tmp_path):
    """A real SIGTERM mid-run exits 143 and leaves a loadable last.pt of the last full epoch."""
    import signal
    import time

    import torch

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    args = [sys.executable, "-m", "tlbench", "trainer.max_epochs=400", "model.image_size=16",
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
    assert main([sub, "--help"]) == 0
    out = capsys.readouterr().out
    assert all(w in out for w in words)


def test_list_accepts_singular_and_plural_with_whole_descriptions(capsys):
    assert main(["list", "dataset"]) == 0
    singular = capsys.readouterr().out
    assert main(["list", "datasets"]) == 0
    assert capsys.readouterr().out == singular and "cifar10" in singular
    assert main(["list", "experiment"]) == 0 and main(["list", "experiments"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("chest_xray_fe_vs_ft"))
    assert line.rstrip().endswith("training from scratch.")  # the whole first paragraph, not one line of it
