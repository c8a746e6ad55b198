"""Rendering for ``tlbench compare``: aggregated rows -> Markdown / CSV / LaTeX tables and a plot."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from .errors import TlbenchError
from .runs import Problem

PERCENT_WORDS = ("accuracy", "f1", "precision", "recall")
FORMATS = {"md": "md", "markdown": "md", "csv": "csv", "latex": "latex", "tex": "latex"}
_MISSING = object()  # a run without the key


@dataclass(frozen=True)
class Metric:
    split: str
    name: str
    task: str

    @property
    def label(self) -> str:
        return f"{self.split}/{self.name}/{self.task}"

    @property
    def percent(self) -> bool:
        return any(w in self.name for w in PERCENT_WORDS)


@dataclass
class Row:
    by: tuple
    values: tuple  # the group's config values, in the order of ``by``
    metric: Metric
    runs: list
    n: int
    mean: Optional[float]
    std: Optional[float]
    ci95: Optional[float]
    trainable: Optional[float]
    best_epoch: Optional[float]
    train_s: Optional[float]
    eval_s: Optional[float]
    train_img_s: Optional[float]
    warnings: list = field(default_factory=list)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_show(v)}" for k, v in zip(self.by, self.values))


def _show(v) -> str:
    if v is _MISSING:
        return "-"
    return v if isinstance(v, str) else json.dumps(v)





def _num(x, digits: int, sep: bool) -> str:
    if x is None:
        return ""
    return f"{x:,.{digits}f}" if sep else f"{x:.{digits}f}"


def _secs(x) -> str:
    return "" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.0f}"


def table(rows: Sequence[Row], sep: bool = True) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells (accuracy-like metrics in percent, 2 decimals)."""
    if not rows:
        return [], []
    m = rows[0].metric
    scale, digits, unit = (100.0, 2, " (%)") if m.percent else (1.0, 4, "")
    head = [*rows[0].by, "n", f"{m.label}{unit}", "std", "95% CI ±", "trainable params", "best epoch",
            "train s/epoch", "eval s/epoch", "train img/s"]
    body = [[*map(_show, r.values), str(r.n), *(_num(None if v is None else v * scale, digits, False)
                                                  for v in (r.mean, r.std, r.ci95)),
             _num(r.trainable, 0, sep), _num(r.best_epoch, 1, False), _secs(r.train_s), _secs(r.eval_s),
             _num(r.train_img_s, 0, sep)] for r in rows]
    return head, body


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
        m = rows[0].metric
        count = f"{sum(len(r.runs) for r in rows)} runs in {len(rows)} group{'s' * (len(rows) != 1)}"
        out += [f"{m.label}: mean over the runs of each group (normally seeds), sample std, "
                f"95% CI half-width (t distribution); {count}.",
                "", line(head), rule, *map(line, body)]
    warn = [w for r in rows for w in r.warnings]
    if warn:
        out += ["", "Warnings:", *(f"- {w}" for w in warn)]
    if problems:
        out += ["", "Not finished (not in the table):", *(f"- {p.line()}" for p in problems)]
    return "\n".join(out) + "\n"


def _csv(rows) -> str:
    head, body = table(rows, sep=False)
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
    out += [f"% {n}" for n in notes(rows, problems)]
    return "\n".join(out) + "\n"


def render(rows: Sequence[Row], fmt: str = "md", problems: Sequence[Problem] = ()) -> str:
    """The table as Markdown (with warnings and unfinished runs listed below it), CSV (the table
    only: :func:`notes` has the rest) or a LaTeX tabular (notes as ``%`` comments)."""
    kind = FORMATS.get(fmt)
    if kind is None:
        raise TlbenchError(f"--format {fmt!r} is not known; choose one of 'md', 'csv', 'latex'")
    return _csv(rows) if kind == "csv" else _latex(rows, problems) if kind == "latex" else _markdown(rows, problems)


def plot(rows: Sequence[Row], path) -> Path:
    """Scatter of the metric (mean, std error bars) against trainable parameters (log x), one labelled
    point per group."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pts = [r for r in rows if r.mean is not None and r.trainable]
    if not pts:
        raise TlbenchError("--plot: no group has both a metric value and a trainable-parameter count")
    scale = 100.0 if pts[0].metric.percent else 1.0
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in pts:
        ax.errorbar(r.trainable, r.mean * scale, yerr=(r.std or 0.0) * scale, fmt="o", capsize=4)
        text = ", ".join(_show(v) for v in r.values) + f" (n={r.n})"
        ax.annotate(text, (r.trainable, r.mean * scale), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.2, y=0.15)
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(pts[0].metric.label + (" (%)" if scale == 100.0 else ""))
    ax.set_title(f"{pts[0].metric.label} vs trainable parameters (mean ± std)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=150)
    return path


