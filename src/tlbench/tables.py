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
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
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
SIZES = {"one": (3.5, 2.6), "two": (7.0, 3.2)}
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


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
        shown = self.shown or tuple(_show(v) for v in self.values)
        return ", ".join(f"{k}={s}" for k, s in zip(key_headers(self.by), shown))


def _float(v: float, digits: int) -> str:
    s = f"{v:.{digits}g}"
    return re.sub(r"e([+-])0*(\d)", lambda m: f"e{'-' if m.group(1) == '-' else ''}{m.group(2)}", s)


def _show(v, digits: int = 3) -> str:
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
                    _show(v, digits) == _show(w, digits) for w in floats if w != v):
                digits += 1
            texts.append(_show(v, digits))
        distinct = len({json.dumps(v, default=str) if v is not _MISSING else "\0" for v in vals})
        if len(set(texts)) < distinct:  # (not expected) fall back to full precision
            texts = [_show(v, 17) for v in vals]
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


# ----------------------------------------------------------------------------- the figure
def figure_size(size: str, panels: int = 1) -> tuple[float, float]:
    """``one`` (3.5 in wide: one column of a two-column paper), ``two`` (7 in: the full width) or
    ``WxH`` in inches -> (width, height)."""
    if size in SIZES:
        w, h = SIZES[size]
        return (w, h * panels) if size == "one" else (w, h * ((panels + 1) // 2 if panels > 2 else 1))
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[x×]\s*(\d+(?:\.\d+)?)\s*", str(size))
    if not m or min(float(m.group(1)), float(m.group(2))) <= 0:
        raise TlbenchError(f"--size {size!r}: give one (3.5 in wide, one column), two (7 in, two columns) "
                           f"or WIDTHxHEIGHT in inches, e.g. 3.5x2.5")
    return float(m.group(1)), float(m.group(2))


def plot_paths(spec) -> list[Path]:
    """``--plot a.png,a.pdf`` (or a list) -> paths; each must end in .png, .pdf or .svg."""
    items = spec if isinstance(spec, (list, tuple)) else [spec]
    paths = [Path(p.strip()) for s in items for p in str(s).split(",") if p.strip()]
    bad = [p for p in paths if p.suffix.lower() not in PLOT_SUFFIXES]
    if not paths or bad:
        raise TlbenchError(f"--plot {str(bad[0]) if bad else ''!r}: the file name must end in "
                           f"{', '.join(PLOT_SUFFIXES)} (several: --plot fig.png,fig.pdf)")
    return paths


# legend text of a group key's null value where null has a meaning (the default)
NONE_TEXT = {"model.init_from": "scratch"}
XSCALES = ("auto", "linear", "log")  # auto: log when the x values are positive and span more than 10x
PLOT_KINDS = ("auto", "bars", "curve")  # auto: a curve when the last --by key is numeric (is_curve), else bars


@dataclass
class Series:
    """One line of a curve: the groups that share the values of every ``--by`` key but the last."""

    label: str  # the other keys' values, readable ("scratch" for model.init_from=null); "" when there are none
    x: list  # the last key's values, ascending
    mean: list  # the metric's mean at each x, in the metric's unit (% for accuracy-like metrics)
    err: list  # the half-width of the band at each x (``errorbar``), None where it has none (n=1, ``none``)
    n: list  # runs at each x
    runs: list  # (x, value) of every run


def is_number(v) -> bool:
    """An int or float value (not a bool): a metric, or a config value a curve can have on its x axis."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_curve(rows: Sequence[Row]) -> bool:
    """Whether the plot is a curve: the last ``--by`` key has numbers only, at least two of them."""
    values = [r.values[-1] for r in rows if r.values and any(s.mean is not None for s in r.stats)]
    return bool(values) and all(is_number(v) for v in values) and len(set(values)) > 1


def legend_text(key: str, value, shown: str) -> str:
    """A group key's value as a legend shows it: ``scratch`` for ``model.init_from=null``, the last
    two parts of a path, else the table's text."""
    if value is None:
        return NONE_TEXT.get(key, "none")
    if isinstance(value, str) and len(Path(value).parts) > 2:
        return "…/" + "/".join(Path(value).parts[-2:])
    return shown


def curve_series(rows: Sequence[Row], k: int = 0, errorbar: str = "ci") -> list[Series]:
    """The lines of a curve (:func:`is_curve`) for metric ``k``: one per combination of the other
    ``--by`` keys' values, in the rows' order; x = the last key's value."""
    series: dict[str, Series] = {}
    for r, shown in zip(rows, key_texts(rows)):
        s, scale = r.stats[k], r.stats[k].metric.scale
        if s.mean is None:
            continue
        parts = [legend_text(key, v, t) for key, v, t in zip(r.by[:-1], r.values[:-1], shown[:-1])]
        label = parts[0] if len(parts) == 1 else ", ".join(f"{h}={t}" for h, t in zip(key_headers(r.by[:-1]), parts))
        line = series.setdefault(label, Series(label, [], [], [], [], []))
        err = s.interval(errorbar)
        line.x.append(r.values[-1])
        line.mean.append(s.mean * scale)
        line.err.append(None if err is None else err * scale)
        line.n.append(s.n)
        line.runs += [(r.values[-1], v * scale) for v in s.values]
    for line in series.values():  # ascending x
        order = sorted(range(len(line.x)), key=line.x.__getitem__)
        for name in ("x", "mean", "err", "n"):
            setattr(line, name, [getattr(line, name)[i] for i in order])
    return list(series.values())


def _curve_panel(ax, rows: Sequence[Row], k: int, errorbar: str, xscale: str) -> None:
    """One panel of a curve: per series its means as a line, the band (``errorbar``) and the runs as dots."""
    lines = curve_series(rows, k, errorbar)
    for i, line in enumerate(lines):
        color = f"C{i}"
        ax.plot(line.x, line.mean, marker="o", ms=4, color=color, zorder=3, label=line.label or "mean")
        if any(e is not None for e in line.err):
            lo = [math.nan if e is None else m - e for m, e in zip(line.mean, line.err)]
            hi = [math.nan if e is None else m + e for m, e in zip(line.mean, line.err)]
            ax.fill_between(line.x, lo, hi, color=color, alpha=0.2, linewidth=0, zorder=1)
        ax.scatter([x for x, _ in line.runs], [y for _, y in line.runs], s=9, color=color, alpha=0.6,
                   linewidths=0, zorder=2)
    _curve_xaxis(ax, sorted({x for line in lines for x in line.x}), xscale, key_headers(rows[0].by)[-1])
    ys = [y for line in lines for y in line.mean + [v for _, v in line.runs]]
    pad = 0.15 * (max(ys) - min(ys) or 1.0)
    ax.set_ylim(min(ys) - pad, max(ys) + pad)  # the runs decide the range; a wide interval may leave it
    what = f"line: mean, band: {ERRORBARS[errorbar]}, dots: runs" if errorbar != "none" else "line: mean, dots: runs"
    ax.set_title(what, loc="left", fontsize="small")
    others = key_headers(rows[0].by[:-1])
    ax.legend(loc="best", frameon=False, title=others[0] if len(others) == 1 else None)


def _curve_xaxis(ax, xs: list, xscale: str, header: str) -> None:
    """Ticks at the curve's x values; ``auto``: log when they are positive and span more than 10x."""
    if xscale == "auto":
        xscale = "log" if xs[0] > 0 and xs[-1] / xs[0] > 10 else "linear"
    ax.set_xscale(xscale)
    ax.set_xticks(xs)
    ax.set_xticklabels([_show(float(x)) for x in xs])
    ax.minorticks_off()
    ax.set_xlabel(header + (" (log scale)" if xscale == "log" else ""))


def figure(rows: Sequence[Row], errorbar: str = "ci", size: str = "two", xscale: str = "auto", kind: str = "auto"):
    """A matplotlib Figure, one panel per metric: each group's mean with an error bar (``ci``: 95%
    CI, the table's interval; ``std``; ``none``) and each run's value as a dot. The x axis is the
    trainable-parameter count (log) when it differs between groups, else the groups themselves.
    When the last ``--by`` key is numeric (:func:`is_curve`, e.g. ``dataset.train_fraction``) the
    panel is a curve instead (``kind``: auto, or force bars / curve): x = that key (``xscale``
    auto, linear or log), one line of means per value of the other keys with the interval as a
    band and the runs as dots."""
    import matplotlib
    from matplotlib.figure import Figure

    if errorbar not in ERRORBARS:
        raise TlbenchError(f"--errorbar {errorbar!r}: choose one of {', '.join(ERRORBARS)}")
    if xscale not in XSCALES:
        raise TlbenchError(f"--xscale {xscale!r}: choose one of {', '.join(XSCALES)}")
    if kind not in PLOT_KINDS:
        raise TlbenchError(f"--plot-kind {kind!r}: choose one of {', '.join(PLOT_KINDS)}")
    pts = [r for r in rows if any(s.mean is not None for s in r.stats)]
    if not pts:
        raise TlbenchError("--plot: no group has a value of the metric")
    curve = kind == "curve" or (kind == "auto" and is_curve(pts))
    if curve and not is_curve(pts):
        raise TlbenchError(f"--plot-kind curve: the last --by key ({pts[0].by[-1] if pts[0].by else 'none'}) must "
                           "be numeric with at least two values, e.g. --by model.init_from,dataset.train_fraction")
    metrics = [s.metric for s in pts[0].stats]
    texts = dict(zip(map(id, rows), key_texts(rows)))
    params = sorted({r.trainable for r in pts if r.trainable})
    by_params = len(params) > 1 and all(r.trainable for r in pts)
    width, height = figure_size(size, len(metrics))
    small = width < 5
    cols = 1 if small else min(len(metrics), 2)
    with matplotlib.rc_context({"font.size": 8 if small else 9, "axes.titlesize": 8 if small else 9,
                                "legend.fontsize": 7 if small else 8}):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots((len(metrics) + cols - 1) // cols, cols, squeeze=False).ravel()
        for ax in axes[len(metrics):]:
            ax.set_visible(False)
        for k, (ax, m) in enumerate(zip(axes, metrics)):
            if curve:
                _curve_panel(ax, pts, k, errorbar, xscale)
                ax.set_ylabel(m.heading)
                ax.grid(True, which="major", alpha=0.3)
            else:
                _bars_panel(ax, pts, k, errorbar, texts, by_params)
    return fig


def _bars_panel(ax, pts: Sequence[Row], k: int, errorbar: str, texts: dict, by_params: bool) -> None:
    """Metric ``k`` of each group as its mean with an error bar and its runs as dots; x = the
    trainable-parameter count (log) when ``by_params``, else the groups themselves."""
    m, handles = pts[0].stats[k].metric, []
    for i, r in enumerate(pts):
        s = r.stats[k]
        if s.mean is None:
            continue
        x = r.trainable if by_params else i
        err = s.interval(errorbar)
        label = f"mean ± {ERRORBARS[errorbar]}" if errorbar != "none" else "mean"
        bar = ax.errorbar([x], [s.mean * m.scale], yerr=None if err is None else [err * m.scale], fmt="o",
                          color="C0", ms=4, capsize=3, zorder=3, label=label)
        # the runs beside their mean (not on it), spread a little so equal values stay visible
        jitter = [0.15 + (j - (len(s.values) - 1) / 2) * 0.05 for j in range(len(s.values))]
        xs = [x * (1 + d) for d in jitter] if by_params else [x + d for d in jitter]
        dots = ax.scatter(xs, [v * m.scale for v in s.values], s=9, color="0.45", alpha=0.8, zorder=2,
                          linewidths=0, label="single runs (seeds)")
        handles = handles or [bar, dots]
        if by_params:
            ax.annotate(f"{', '.join(texts[id(r)])} (n={s.n})", (x, s.mean * m.scale),
                        textcoords="offset points", xytext=(5, 4), fontsize=7)
    if by_params:
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
    else:
        ax.set_xticks(range(len(pts)), [f"{', '.join(texts[id(r)])}\nn={r.stats[k].n}" for r in pts])
        ax.set_xlabel(", ".join(key_headers(pts[0].by)))
        ax.set_xlim(-0.5, len(pts) - 0.5)
    ax.margins(y=0.15)
    ax.set_ylabel(m.heading)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    ax.legend(handles=handles, loc="best", frameon=False)


def plot(rows: Sequence[Row], path, errorbar: str = "ci", size: str = "two", xscale: str = "auto", kind: str = "auto"):
    """Write :func:`figure` to ``path`` (.png at 300 dpi, .pdf, .svg with text kept as text; several
    paths: a list or ``a.png,a.pdf``). Returns the path (a list when several were asked)."""
    import matplotlib

    paths = plot_paths(path)
    fig = figure(rows, errorbar, size, xscale, kind)
    with matplotlib.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none",
                                "svg.hashsalt": "tlbench"}):
        for p in paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(p, dpi=300, metadata={"Date": None} if p.suffix.lower() in (".svg", ".pdf") else None)
    return paths[0] if len(paths) == 1 and not isinstance(path, (list, tuple)) and "," not in str(path) else paths
