"""What a run prints (issue #16): a compact line per epoch off a terminal, bars on one (epochs,
batches, the one-off frozen-prefix and decoding passes), ``--quiet`` (warnings and the final
summary only) and ``--verbose`` (debug detail); ``train.log`` always has the full detail."""

from __future__ import annotations

import re
import sys

import pytest
from conftest import BrokenLogger

SHORT = ("trainer.max_epochs=2", "trainer.batch_size=128")
TIME = r"\d\d:\d\d:\d\d"


def _run(tmp_path, *args, progress: bool = False):
    from tlbench.cli import main

    run = tmp_path / "run"
    try:
        code = main([*args, *SHORT, f"hydra.run.dir={run}", f"trainer.progress={str(progress).lower()}"])
    except SystemExit as e:
        code = e.code
    return code, run


def _summary(run) -> list[str]:
    return [r"test accuracy: label 0\.\d{4} \(best epoch \d, 20,138 of 20,138 parameters trained\)",
            f"run directory: {re.escape(str(run))}", f"inspect with:  tensorboard --logdir {re.escape(str(run / 'tb'))}"]


def test_default_console_is_compact_one_line_per_epoch(tmp_path, capsys):
    code, run = _run(tmp_path)
    out, err = capsys.readouterr()
    assert code == 0 and "it/s" not in err and "epochs" not in err  # no bars off a terminal
    lines = out.splitlines()
    epochs = [ln for ln in lines if re.match(TIME + " epoch ", ln)]
    assert len(epochs) == 2
    assert re.fullmatch(TIME + r" epoch 1/2 train_loss=\d\.\d{4} val_loss=\d\.\d{4} val_acc\[label=0\.\d{4}\] "
                        r"\(\d+\.\ds\+\d+\.\ds\)( \*best\*)? eta \d+s", epochs[0]), epochs[0]
    assert re.fullmatch(TIME + r" epoch 2/2 .*\)( \*best\*)?", epochs[1]), epochs[1]  # no eta after the last
    assert not [ln for ln in lines if "DEBUG" in ln or "tlbench." in ln or "{" in ln]  # no logger names, no dicts
    for pattern, line in zip(_summary(run), lines[-3:]):
        assert re.fullmatch(pattern, line), line
    log = (run / "train.log").read_text()  # the full detail
    assert "[tlbench.run][INFO] - epoch 1/2" in log and "[tlbench.run][DEBUG] - config (hash" in log
    assert "[tlbench.run][DEBUG] - class counts per split: {'train': {'label': {'0': " in log


def test_quiet_prints_warnings_and_the_summary_only(tmp_path, capsys, monkeypatch):
    from tlbench import loggers

    monkeypatch.setattr(loggers, "MlflowLogger", BrokenLogger)  # a warning to see
    code, run = _run(tmp_path, "--quiet", "logger=[tensorboard,csv,mlflow]", progress=True)
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert len(lines) == 4, out
    assert lines[0].endswith("logger mlflow failed and is off for the rest of this run (RuntimeError: store is "
                             "gone); the run goes on, and results.json and the checkpoints do not depend on it")
    for pattern, line in zip(_summary(run), lines[1:]):
        assert re.fullmatch(pattern, line), line
    log = (run / "train.log").read_text()
    assert "epoch 2/2" in log and "[DEBUG]" in log and "train split: 1258 items" in log


def test_quiet_sweep_hides_hydra_lines(tmp_path, capsys):
    from tlbench.cli import main

    code = main(["-q", "-m", "seed=0,1", "trainer.max_epochs=1", "trainer.progress=false",
                 f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    out = capsys.readouterr().out
    assert code == 0 and "HYDRA" not in out and "Launching" not in out and not re.search(TIME + " epoch ", out)
    assert [ln.split(":")[0] for ln in out.splitlines()] == ["val accuracy", "run directory", "test metrics are kept for "
                                                             "the end of the sweep", "runs by their overrides"] * 2


def test_verbose_shows_debug_detail_with_logger_names(tmp_path, capsys):
    code, run = _run(tmp_path, "--verbose")
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"\]\[tlbench\.run\]\[DEBUG\] - config \(hash [0-9a-f]{16}\): \{'dataset'", out)
    assert re.search(r"\]\[tlbench\.run\]\[INFO\] - epoch 1/2 train_loss=", out)
    assert "[tlbench.loggers][DEBUG] - loggers ['tensorboard', 'csv']" in out


def test_quiet_and_verbose_together_are_refused(tmp_path, capsys):
    code, run = _run(tmp_path, "--quiet", "-v")
    assert code == 2 and "--quiet and --verbose contradict each other" in capsys.readouterr().err
    assert not run.exists()


def test_bars_on_a_terminal(tmp_path, capsys, monkeypatch):
    """On a terminal: a bar while decoding a split, during the frozen-prefix pass, per epoch (k/N,
    the last validation metrics) and per batch; the epoch lines still go above them."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, run = _run(tmp_path, "freeze=linear_probe", "dataset.pipeline=loader", progress=True)
    out, err = capsys.readouterr()
    assert code == 0
    err = err.replace("\r", "\n")
    assert re.search(r"decoding 1258 images: +\d+%\|.*\| \d+/1257 ", err)
    assert re.search(r"frozen prefix \(1258 images\): +\d+%\|.*\| \d+/\d+ ", err)
    # the epoch bar stays: k/N, elapsed<ETA, the last validation metrics and the best epoch
    assert re.search(r"epochs: 100%\|.*\| 2/2 \[\d\d:\d\d<\d\d:\d\d, .*val_loss \d\.\d{4} val_acc 0\.\d{4} best@\d\]", err)
    assert "epoch 1 train: " in err and "epoch 2 val: " in err
    assert len([ln for ln in out.splitlines() if re.match(TIME + " epoch ", ln)]) == 2


def test_trainer_progress_false_turns_bars_off_on_a_terminal(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _ = _run(tmp_path, "freeze=linear_probe", progress=False)
    assert code == 0 and "%|" not in capsys.readouterr().err


def test_prefix_pass_announces_itself_off_a_terminal(tmp_path, capsys):
    code, _ = _run(tmp_path, "freeze=linear_probe")
    out = capsys.readouterr().out
    assert code == 0
    for n in (1258, 269, 270):
        assert re.search(TIME + f" frozen prefix: computing the outputs of {n} images \\(once\\)$", out, re.M)


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59.6, "1m00s"), (125, "2m05s"), (3 * 3600 + 120, "3h02m")])
def test_durations(seconds, text):
    from tlbench.progress import duration

    assert duration(seconds) == text
