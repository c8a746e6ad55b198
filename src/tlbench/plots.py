"""The figure of ``tlbench compare --plot``: each group's mean with an error bar and its runs as
dots (bars), or, when the last ``--by`` key is numeric, one line per value of the other keys with
the interval as a band (a label-efficiency curve). Rows and labels come from ``tables``.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .errors import TlbenchError
from .tables import ERRORBARS, Row, is_number, key_headers, key_texts, show_value

SIZES = {"one": (3.5, 2.6), "two": (7.0, 3.2)}
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


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
    ax.set_xticklabels([show_value(float(x)) for x in xs])
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
            tmp = p.with_name(f".{p.stem}.{os.getpid()}.tmp{p.suffix}")  # the suffix picks the format
            try:  # an existing file is replaced whole or kept, never left half-written
                fig.savefig(tmp, dpi=300, metadata={"Date": None} if p.suffix.lower() in (".svg", ".pdf") else None)
                os.replace(tmp, p)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    return paths[0] if len(paths) == 1 and not isinstance(path, (list, tuple)) and "," not in str(path) else paths
