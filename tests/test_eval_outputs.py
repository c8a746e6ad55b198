"""``tlbench eval RUN_DIR``: where it writes (only ``RUN_DIR/eval_<name>/``, never the run's own
record, never outside), what its ``eval.log`` holds, and what its folder holds (README: the numbers
in its ``results.json`` are recomputed from its ``predictions/``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # conftest, whatever pytest's import mode

from tlbench import evaluate  # noqa: E402
from tlbench.errors import TlbenchError  # noqa: E402

TINY = ("trainer.max_epochs=1", "trainer.limit_train_batches=4", "trainer.batch_size=64")


def _cli(*argv: str) -> int:
    from tlbench.cli import main

    try:
        return main(list(argv))
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 1-epoch run on the embedded digits (read-only: tests copy it)."""
    rd = tmp_path_factory.mktemp("finished") / "run"
    assert _cli(*TINY, f"hydra.run.dir={rd}", "trainer.progress=false") == 0
    return rd


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run at ``tmp_path/runs/run`` (``tmp_path/runs`` holds nothing else)."""
    return Path(shutil.copytree(finished, tmp_path / "runs" / "run"))


def _snapshot(root: Path) -> dict:
    """Every path under ``root`` (links not followed) -> its bytes (None for a folder or link)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            out[str(p.relative_to(root))] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


# ----------------------------------------------------------------------------- where eval writes
@pytest.mark.parametrize("name", ["../..", "../../escape", "..", "a/b", "", "/tmp/x", "x..y", "sp ace"])
def test_name_must_be_a_plain_folder_name_part(run, capsys, name):
    """``name=../..`` overwrote the run's results.json and predictions; ``name=../../escape`` wrote
    next to the run. Any name that is not a plain folder-name part is exit 2, the rule stated, and
    nothing anywhere is written."""
    root = run.parent
    before = _snapshot(root)
    assert _cli("eval", str(run), "split=train", f"name={name}") == 2
    err = capsys.readouterr().err
    assert f"name={name!r} is not valid" in err and "letters, digits" in err and "no '..'" in err
    assert "Traceback" not in err
    assert _snapshot(root) == before


def test_plain_names_work(run):
    assert evaluate.eval_dir(run, "test", "held-out_2.v1") == run / "eval_held-out_2.v1"
    assert evaluate.eval_dir(run, "val", None) == run / "eval_val"


@pytest.mark.parametrize("name", ["../..", "../../escape", "../checkpoints", "x/../../results.json"])
def test_eval_never_writes_outside_its_folder_whatever_the_name(run, monkeypatch, name):
    """Defence in depth: with the name rule switched off, the folder check alone still refuses
    every name that would land on the run's own files or outside the run directory."""
    monkeypatch.setattr(evaluate, "check_name", lambda name: None)
    root = run.parent
    before = _snapshot(root)
    with pytest.raises(TlbenchError, match="not a folder of its own"):
        evaluate.evaluate_run(run, "train", {}, name)
    assert _snapshot(root) == before


@pytest.mark.parametrize("target", ["run", "outside"])
def test_eval_does_not_follow_a_link(run, capsys, target):
    """``eval_<name>`` that is a link (to the run itself, or elsewhere) is refused, not written through."""
    outside = run.parent / "outside"
    outside.mkdir()
    (run / "eval_link").symlink_to(run if target == "run" else outside, target_is_directory=True)
    before = _snapshot(run.parent)
    assert _cli("eval", str(run), "name=link") == 2
    err = capsys.readouterr().err
    assert "not a folder of its own" in err and "Traceback" not in err
    assert _snapshot(run.parent) == before


# ----------------------------------------------------------------------------- eval.log
def test_eval_log_holds_what_eval_did(run, capsys):
    """eval.log was always empty (opened after everything that logs). It holds what was evaluated,
    the checkpoint, the data and the metrics the console printed; a second evaluation into the same
    folder replaces it (the log of the evaluation the folder holds)."""
    for _ in range(2):
        assert _cli("eval", str(run), "split=val", "name=v") == 0
    printed = capsys.readouterr().out.splitlines()
    out = run / "eval_v"
    text = (out / "eval.log").read_text()
    res = json.loads((out / "results.json").read_text())
    m = res["val"]["label"]
    config_hash = (run / "config_hash").read_text().strip()
    assert text.count("tlbench eval ") == 1, "the log of one evaluation, not appended to an earlier one"
    for needle in (f"tlbench eval {run}: split=val into {out}",
                   f"checkpoint {run / 'checkpoints' / 'best.pt'}: epoch {res['checkpoint_epoch']}, "
                   f"config_hash {config_hash}",
                   "data: sklearn_digits",
                   f"val split: {m['n']} items",  # the data's own lines, logged before the folder existed
                   f"evaluating val: {m['n']} items (dataset_fingerprint {res['dataset_fingerprint']})",
                   f"val metrics ({m['n']} items):",
                   f"label: accuracy {m['accuracy']:.4f}"):
        assert needle in text, needle
    metric_lines = [ln for ln in printed if ln.startswith("  label: ")]
    assert metric_lines and all(ln in text for ln in metric_lines)  # what the console printed
    assert "results.json" in text.splitlines()[-1] and "predictions/label.csv" in text.splitlines()[-1]


def test_a_refused_eval_leaves_no_log(run, capsys):
    assert _cli("eval", str(run), "dataset.val_fraction=2") == 2
    assert not list(run.glob("eval_*"))


# ----------------------------------------------------------------------------- what the folder holds
def test_eval_folder_holds_what_the_readme_says(run):
    """README (``tlbench eval``): one split's metrics under its name and nothing made up for the
    others; the numbers recompute from the folder's own predictions."""
    assert _cli("eval", str(run), "split=val", "name=v") == 0
    out = run / "eval_v"
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"run_dir", "split", "dataset", "dataset_fingerprint", "checkpoint_epoch", "params", "val"}
    assert res["split"] == "val" and res["run_dir"] == str(run)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {"results.json", "predictions/label.csv", "classification_report_label.txt", "splits.json", "eval.log",
            "figures/confusion_label.png", "figures/reliability_label.png"} <= files
    assert not any(f.startswith(("checkpoints/", "tb/")) or f == "metrics.csv" for f in files)
    with open(out / "predictions" / "label.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    m = res["val"]["label"]
    assert m["n"] == len(rows)
    assert m["accuracy"] == pytest.approx(sum(r["target"] == r["pred"] for r in rows) / len(rows), abs=1e-12)
    assert [int(r["index"]) for r in rows] == json.loads((out / "splits.json").read_text())["val"]


# ----------------------------------------------------------------------------- faults while eval writes
def test_an_eval_stopped_while_writing_leaves_the_previous_evaluation_whole(run, monkeypatch):
    """A second evaluation into ``eval_<name>/`` that stops while writing (kill, full disk: here the
    write of its results.json fails) leaves the previous evaluation byte-identical. It used to write
    straight into the folder: new predictions/ and figures next to the old results.json (a kill -9
    by hand left the predictions of val under the results.json of test, and check_run said OK)."""
    import socket

    assert _cli("eval", str(run), "split=test", "name=x") == 0
    before = _snapshot(run / "eval_x")
    real = evaluate.write_json

    def full_disk(path, data):
        if Path(path).name == "results.json":
            raise OSError(27, "File too large")
        real(path, data)

    monkeypatch.setattr(evaluate, "write_json", full_disk)
    with pytest.raises(OSError):
        evaluate.evaluate_run(run, "val", {}, "x")
    assert _snapshot(run / "eval_x") == before
    assert not list(run.glob(".eval_x.partial-*")), "a failed evaluation removes its temp folder"
    monkeypatch.setattr(evaluate, "write_json", real)
    dead = run / f".eval_x.partial-{socket.gethostname()}-999999999"  # left by a kill -9
    (dead / "predictions").mkdir(parents=True)
    assert _cli("eval", str(run), "split=val", "name=x") == 0
    assert json.loads((run / "eval_x" / "results.json").read_text())["split"] == "val"
    assert not dead.exists(), "the temp folder of a killed evaluation is removed by the next one"
