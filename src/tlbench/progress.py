"""Progress on the console: tqdm bars on a terminal, compact log lines elsewhere.

On a terminal (stderr is a TTY, ``trainer.progress=true``, not ``--quiet``) a run shows an
epoch bar (epoch k/N, ETA, the last validation metrics) above the batch bar of ``run_epoch``,
and a bar for each one-off pass (the frozen-prefix pass, decoding a split into memory). Log
lines are written above the bars (``tqdm.contrib.logging``). Elsewhere (CI, SLURM logs) there
are no bars: one compact line per epoch (``run.py``'s epoch line, with an ETA) and a line when a
long one-off pass starts. Nothing here syncs with the device: the bars are fed numbers the loop
has already brought to the host.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys

from tqdm import tqdm

_wanted = {"console": True, "config": True}  # off with --quiet (cli) / trainer.progress=false (run)


def configure(console: bool | None = None, config: bool | None = None) -> None:
    """``console``: the CLI's say (``--quiet`` turns bars off); ``config``: the run's ``trainer.progress``."""
    for key, value in (("console", console), ("config", config)):
        if value is not None:
            _wanted[key] = bool(value)


def enabled() -> bool:
    """Bars are wanted (by the CLI and the run's config) and stderr is a terminal."""
    stream = sys.stderr
    return all(_wanted.values()) and stream is not None and hasattr(stream, "isatty") and stream.isatty()


def bar(iterable=None, total=None, desc: str = "", unit: str = "it", leave: bool = False):
    """A tqdm bar when :func:`enabled`, else a disabled one (no output, no cost)."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled(),
                dynamic_ncols=True)


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``: compact, for log lines."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta(history: list, max_epochs: int) -> str:
    """Time left at the mean epoch time so far ('' after the last epoch)."""
    left = max_epochs - (history[-1]["epoch"] if history else 0)
    if left <= 0 or not history:
        return ""
    per = sum(h["train_seconds"] + h["val_seconds"] for h in history) / len(history)
    return duration(per * left)


def val_summary(rec: dict) -> str:
    """``val_loss 0.5502 val_acc 0.9442`` (mean over tasks) from an epoch record."""
    accs = list(rec["val"]["accuracy"].values())
    return f"val_loss {rec['val']['loss']:.4f} val_acc {sum(accs) / max(len(accs), 1):.4f}"


class EpochBar:
    """The epoch bar of a run: k/N epochs, tqdm's ETA, the last validation metrics and the best
    epoch so far. ``hooked(hooks)`` returns the fit hooks with the bar advanced after each epoch's
    log line. A context manager: while it is open, log lines go above the bars."""

    def __init__(self, max_epochs: int, done: int = 0, show: bool = True):
        self.show = show and enabled()
        self.bar = tqdm(total=max_epochs, initial=done, desc="epochs", unit="epoch", leave=True,
                        disable=not self.show, dynamic_ncols=True)
        self._redirect = contextlib.ExitStack()

    def __enter__(self) -> "EpochBar":
        if self.show:
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm())
        return self

    def __exit__(self, *exc) -> bool:
        self.bar.close()
        self._redirect.close()
        return False

    def update(self, state, rec: dict) -> None:
        best = f" best@{state.best_epoch}" if state.best_epoch else ""
        self.bar.set_postfix_str(val_summary(rec) + best, refresh=False)
        self.bar.update(1)

    def hooked(self, hooks):
        log_epoch = hooks.log_epoch

        def log_and_advance(state, rec: dict) -> None:
            log_epoch(state, rec)
            self.update(state, rec)

        return dataclasses.replace(hooks, log_epoch=log_and_advance)
