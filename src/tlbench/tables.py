"""Rendering for ``tlbench compare``: aggregated rows -> Markdown / CSV / LaTeX tables and a figure.

Labels are written for a paper: metrics as ``test accuracy (label) [%]`` (not
``test/accuracy/label``), group keys as ``model`` / ``lr`` (not ``model.name`` / ``optim.lr``),
float values rounded to the fewest significant digits (at least 3) that keep the groups apart
(``0.0212``, not ``0.021240374487011344``).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .errors import TlbenchError
from .runs import Problem

PERCENT_WORDS = ("accuracy", "f1", "precision", "recall")
FORMATS = {"md": "md", "markdown": "md", "csv": "csv", "latex": "latex", "tex": "latex"}
_MISSING = object()  # a run without the key

# metric names as a paper writes them; others: underscores -> spaces
_NAMES = {"macro_f1": "macro F1", "weighted_f1": "weighted F1", "log_loss": "log-loss", "ece": "ECE",
          "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC", "mse": "MSE", "psnr": "PSNR (dB)", "ssim": "SSIM"}
# error bars of the plot: option -> legend text
ERRORBARS = {"ci": "95% CI (t, n-1)", "std": "1 std", "none": None}
# figure widths (inches) of a one- and a two-column paper figure; height per panel


def metric_name(name: str) -> str:
    """``macro_f1`` -> ``macro F1``, ``top3_accuracy`` -> ``top-3 accuracy``, ``ece`` -> ``ECE``."""
    if name in _NAMES:
        return _NAMES[name]
    top = re.fullmatch(r"top(\d+)_(.*)", name)
    if top:
        return f"top-{top.group(1)} {metric_name(top.group(2))}"
    return name.replace("_", " ")


@dataclass(frozen=True)
class Metric:
    split: str
    name: str
    task: str

    @property
    def label(self) -> str:
        """The machine form, as ``--metric`` takes it: ``test/accuracy/label``."""
        return f"{self.split}/{self.name}/{self.task}"

    @property
    def title(self) -> str:
        """The readable form: ``test accuracy (label)``."""
        return f"{self.split} {metric_name(self.name)} ({self.task})" if self.task else \
            f"{self.split} {metric_name(self.name)}"

    @property
    def percent(self) -> bool:
        return any(w in self.name for w in PERCENT_WORDS)

    @property
    def heading(self) -> str:
        """Column / axis label with its unit: ``test accuracy (label) [%]``."""
        return self.title + (" [%]" if self.percent else "")

    @property
    def scale(self) -> float:
        return 100.0 if self.percent else 1.0


@dataclass
class Stat:
    """One metric over the runs of a group: the per-run values and their summary."""

    metric: Metric
    values: list  # one value per run that has the metric (normally one per seed)
    n: int
    mean: Optional[float]
    std: Optional[float]
    ci95: Optional[float]

    def interval(self, kind: str) -> Optional[float]:
        """The half-width of the error bar: ``ci`` (95% CI), ``std`` or ``none``."""
        return {"ci": self.ci95, "std": self.std}.get(kind)


@dataclass
class Row:
    by: tuple
    values: tuple  # the group's config values, in the order of ``by``
    runs: list
    stats: list  # one :class:`Stat` per metric asked for, in that order
    trainable: Optional[float] = None
    best_epoch: Optional[float] = None
    train_s: Optional[float] = None  # seconds of one training epoch (mean over epochs and runs)
    eval_s: Optional[float] = None  # seconds of one validation pass
    train_img_s: Optional[float] = None  # training images per second; None where training read stored features
    total_s: Optional[float] = None  # wall time of a whole run: setup, feature pass, epochs, evaluation
    feature_s: Optional[float] = None  # the one-off feature pass (None: the run had none)
    warnings: list = field(default_factory=list)
    shown: Optional[tuple] = None  # the values as the table shows them (see :func:`key_texts`)
    left_out: list = field(default_factory=list)  # runs repeating a (config, seed) of ``runs``: not counted

    # the first metric, for callers that ask for one
    @property
    def metric(self) -> Metric:
        return self.stats[0].metric

    @property
    def n(self) -> int:
        return self.stats[0].n

    @property
    def mean(self) -> Optional[float]:
        return self.stats[0].mean

    @property
    def std(self) -> Optional[float]:
        return self.stats[0].std

    @property
    def ci95(self) -> Optional[float]:
        return self.stats[0].ci95

    @property
    def epoch_s(self) -> Optional[float]:
        """One training epoch plus its validation pass."""
        return None if self.train_s is None else self.train_s + (self.eval_s or 0.0)

    @property
    def label(self) -> str:
        shown = self.shown or tuple(show_value(v) for v in self.values)
        return ", ".join(f"{k}={s}" for k, s in zip(key_headers(self.by), shown))


def _float(v: float, digits: int) -> str:
    s = f"{v:.{digits}g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", s)


def show_value(v, digits: int = 3) -> str:
    """A config value as a table shows it; floats with ``digits`` significant digits."""
    if v is _MISSING:
        return "-"
    if isinstance(v, float):
        return _float(v, digits)
    return v if isinstance(v, str) else json.dumps(v)


def key_texts(rows: Sequence[Row]) -> list[tuple]:
    """The rows' config values as text, floats rounded to the fewest significant digits (>= 3)
    that keep distinct values of a column distinct."""
    if not rows:
        return []
    columns = []
    for j in range(len(rows[0].values)):
        vals = [r.values[j] for r in rows]
        floats = sorted({v for v in vals if isinstance(v, float)})
        texts = []
        for v in vals:  # each value: the fewest digits that tell it from every other value
            digits = 3
            while isinstance(v, float) and digits < 17 and any(
                    show_value(v, digits) == show_value(w, digits) for w in floats if w != v):
                digits += 1
            texts.append(show_value(v, digits))
        distinct = len({json.dumps(v, default=str) if v is not _MISSING else "\0" for v in vals})
        if len(set(texts)) < distinct:  # (not expected) fall back to full precision
            texts = [show_value(v, 17) for v in vals]
        columns.append(texts)
    return list(zip(*columns))


def key_headers(by: Sequence[str]) -> list[str]:
    """``model.name`` -> ``model``, ``optim.lr`` -> ``lr``, ``trainer.max_epochs`` -> ``max epochs``;
    the dotted key where the short form would be ambiguous."""
    short = [k[: -len(".name")] if k.endswith(".name") else k.rsplit(".", 1)[-1].replace("_", " ") for k in by]
    return [s if short.count(s) == 1 else k for s, k in zip(short, by)]


def _num(x, digits: int, sep: bool) -> str:
    if x is None:
        return ""
    return f"{x:,.{digits}f}" if sep else f"{x:.{digits}f}"


def _secs(x) -> str:
    return "" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def _metric_headers(metrics: Sequence[Metric], unique: bool) -> list[str]:
    out = []
    for m in metrics:
        if unique and len(metrics) > 1:  # CSV: each column has its own name
            out += [m.heading, f"std ({m.title})", f"95% CI ± ({m.title})"]
        else:  # std and CI follow their metric's column
            out += [m.heading, "std", "95% CI ±"]
    return out


def table(rows: Sequence[Row], sep: bool = True, unique: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells: the group keys, n, per metric mean / std / 95% CI half-width
    (accuracy-like metrics in percent with 2 decimals, others with 4), then the costs: trainable
    parameters, best epoch, total seconds per run, the feature pass (when a run had one),
    seconds per epoch (training + validation), training images per second. ``unique``: name each
    metric's std and CI columns after it (for CSV, where columns are addressed by name)."""
    if not rows:
        return [], []
    metrics = [s.metric for s in rows[0].stats]
    features = any(r.feature_s is not None for r in rows)
    head = [*key_headers(rows[0].by), "n", *_metric_headers(metrics, unique), "trainable params", "best epoch",
            "total s", *(["feature pass s"] if features else []), "s/epoch", "train img/s"]
    body = []
    for r, shown in zip(rows, key_texts(rows)):
        cells = [*shown, str(r.n)]
        for s in r.stats:
            digits = 2 if s.metric.percent else 4
            cells += [_num(None if v is None else v * s.metric.scale, digits, False) for v in (s.mean, s.std, s.ci95)]
        cells += [_num(r.trainable, 0, sep), _num(r.best_epoch, 1, False), _secs(r.total_s)]
        cells += [_secs(r.feature_s)] if features else []
        cells += [_secs(r.epoch_s), _num(r.train_img_s, 0, sep)]
        body.append(cells)
    return head, body


def legend(rows: Sequence[Row]) -> str:
    """What the numbers are, one paragraph (above the Markdown table, a comment in LaTeX)."""
    if not rows:
        return ""
    titles = "; ".join(s.metric.title for s in rows[0].stats)
    count = f"{sum(len(r.runs) for r in rows)} runs in {len(rows)} group{'s' * (len(rows) != 1)}"
    repeated = sum(len(r.left_out) for r in rows)
    count += f" ({repeated} repeated run{'s' * (repeated != 1)} left out)" if repeated else ""
    features = any(r.feature_s is not None for r in rows)
    return (f"{titles}: mean over the runs of each group (normally seeds), sample std, 95% CI half-width "
            f"(t distribution); {count}. total s: wall time of a whole run (setup, "
            f"{'feature pass, ' if features else ''}training, evaluation); s/epoch: one training epoch and its "
            f"validation pass; train img/s: training images per second"
            f"{', blank where a run trained on stored features' if features else ''}.")


def notes(rows: Sequence[Row], problems: Sequence[Problem] = ()) -> list[str]:
    return [w for r in rows for w in r.warnings] + [p.line() for p in problems]


def _markdown(rows, problems) -> str:
    head, body = table(rows)
    nby = len(rows[0].by) if rows else 0
    widths = [max(len(c) for c in col) for col in zip(head, *body)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i >= nby else c.ljust(w)  # noqa: E731
                                          for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i >= nby else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    out = []
    if rows:
        out += [legend(rows), "", line(head), rule, *map(line, body)]
    warn = [w for r in rows for w in r.warnings]
    if warn:
        out += ["", "Warnings:", *(f"- {w}" for w in warn)]
    if problems:
        out += ["", "Not finished (not in the table):", *(f"- {p.line()}" for p in problems)]
    return "\n".join(out) + "\n"


def _csv(rows) -> str:
    head, body = table(rows, sep=False, unique=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(body)
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex(s: str) -> str:
    return "".join(_TEX.get(c, c) for c in s).replace("±", r"$\pm$")


def _latex(rows, problems) -> str:
    head, body = table(rows)
    nby = len(rows[0].by) if rows else 0
    spec = "l" * nby + "r" * (len(head) - nby)
    out = [rf"\begin{{tabular}}{{{spec}}}", r"\hline", " & ".join(map(_tex, head)) + r" \\", r"\hline"]
    out += [" & ".join(map(_tex, cells)) + r" \\" for cells in body]
    out += [r"\hline", r"\end{tabular}"]
    out += [f"% {legend(rows)}"] if rows else []
    out += [f"% {n}" for n in notes(rows, problems)]
    return "\n".join(out) + "\n"


def render(rows: Sequence[Row], fmt: str = "md", problems: Sequence[Problem] = ()) -> str:
    """The table as Markdown (with warnings and unfinished runs listed below it), CSV (the table
    only: :func:`notes` has the rest) or a LaTeX tabular (notes as ``%`` comments)."""
    kind = FORMATS.get(fmt)
    if kind is None:
        raise TlbenchError(f"--format {fmt!r} is not known; choose one of 'md', 'csv', 'latex'")
    return _csv(rows) if kind == "csv" else _latex(rows, problems) if kind == "latex" else _markdown(rows, problems)


def is_number(v) -> bool:
    """An int or float value (not a bool): a metric, or a config value a curve can have on its x axis."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)
