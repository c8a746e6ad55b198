"""``tlbench compare``: run directories and sweeps -> one table (and a plot), a row per config group.

    tlbench compare SWEEP_DIR|RUN_DIR... [--by model,freeze] [--metric test/accuracy[,test/macro_f1]]
                    [--format md|csv|latex] [--out FILE] [--plot FILE.png[,FILE.pdf]]
                    [--errorbar ci|std|none] [--size one|two|WxH]
                    [--plot-kind auto|bars|curve] [--xscale auto|linear|log]

Pure pieces, usable from tests and notebooks without the CLI:

- ``collect_runs(paths) -> (runs, problems)``: finds run directories (recursively) and reads
  ``.hydra/config.yaml``, ``.hydra/overrides.yaml`` and ``results.json``. A run directory without
  a readable ``results.json`` (and a job of a basic sweep that never got a directory) becomes a
  :class:`Problem`, listed in the output, never silently dropped.
- ``aggregate(runs, by, metric) -> rows``: groups runs by dotted config keys and aggregates over
  the rest (normally the seeds), each (config, seed) once (``distinct_runs``: a repeated run, e.g. a
  copied folder, is left out with a warning naming it), per metric (``metric`` may name several): n, mean, sample std,
  95% CI half-width (t distribution); and the costs: trainable parameters, best epoch, total
  wall time per run (the one-off feature pass included), seconds per epoch, training images per
  second (only for runs that trained on images); warnings per group.
- ``tables.render(rows, fmt, problems=())`` -> Markdown, CSV or LaTeX text; ``plots.plot(rows, path,
  errorbar, size, xscale, kind)`` -> PNG / PDF / SVG: bars per group, or a curve when the last ``--by``
  key is numeric (``plots.curve_series``: the lines it draws).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import TlbenchError
from .runs import Run, collect_runs
from .plots import PLOT_KINDS, XSCALES, figure_size, plot, plot_paths
from .tables import _MISSING, ERRORBARS, FORMATS, Metric, Row, Stat, is_number, key_texts, notes, render

ALIASES = {"model": "model.name", "freeze": "freeze.name", "dataset": "dataset.name", "optim": "optim.name",
           "sched": "sched.name"}
# keys that never define a group by default (and may differ inside one without a warning)
NOT_A_GROUP = ("seed", "trainer.resume", "trainer.progress")
SPLITS = ("test", "val")


# ----------------------------------------------------------------------------- keys and metrics
def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _canonical(key: str, runs: Sequence[Run]) -> str:
    key = ALIASES.get(key, key)
    if any(isinstance(_get(r.config, key), dict) and "name" in _get(r.config, key) for r in runs):
        return f"{key}.name"
    return key


def _ident(value) -> str:
    return "\0missing" if value is _MISSING else json.dumps(value, sort_keys=True, default=str)


def _default_by(runs: Sequence[Run]) -> list[str]:
    keys = []
    for r in runs:
        for o in r.overrides:
            key = _canonical(o.split("=", 1)[0].lstrip("+~"), runs)
            if key not in keys and not key.startswith("hydra.") and key not in NOT_A_GROUP:
                keys.append(key)
    varying = [k for k in keys if len({_ident(_get(r.config, k)) for r in runs}) > 1]
    return varying or ["model.name"]


def resolve_by(runs: Sequence[Run], by) -> list[str]:
    """``--by`` (comma-separated or a list; None = the varying overridden keys) -> dotted config keys."""
    if by is None or by == "" or by == []:
        return _default_by(runs)
    names = [k.strip() for k in (by.split(",") if isinstance(by, str) else by) if k.strip()]
    keys = [_canonical(k, runs) for k in names]
    available = sorted({k for r in runs for k in _flatten(r.config) if not k.startswith("hydra.")})
    unknown = [n for n, k in zip(names, keys) if all(_get(r.config, k) is _MISSING for r in runs)]
    if unknown:
        raise TlbenchError(f"--by: unknown config key {unknown[0]!r}; the runs' keys are: {', '.join(available)} "
                           f"(short forms: {', '.join(f'{a}={k}' for a, k in ALIASES.items())})")
    return keys


def _numeric_metrics(results: dict) -> dict:
    """``{split: {task: [metric names]}}`` of the scalar metrics in one results.json."""
    out = {}
    for split in SPLITS:
        for task, m in (results.get(split) or {}).items():
            if isinstance(m, dict):
                out.setdefault(split, {})[task] = [k for k, v in m.items() if k != "n" and is_number(v)]
    return out


def resolve_metric(runs: Sequence[Run], metric: Optional[str]) -> Metric:
    """``split/name[/task]`` (default ``test/accuracy`` of the first task; ``test/mse`` for
    reconstruction runs, which have no accuracy) -> :class:`Metric`."""
    found = [_numeric_metrics(r.results) for r in runs]
    if metric is None and not any("accuracy" in ns for f in found for ns in f.get("test", {}).values()):
        metric = "test/mse" if any("mse" in ns for f in found for ns in f.get("test", {}).values()) else None
    names = sorted({f"{s}/{n}" for f in found for s, tasks in f.items() for ns in tasks.values() for n in ns})
    tasks = list(dict.fromkeys(t for f in found for s in f.values() for t in s))
    parts = (metric or "test/accuracy").strip("/").split("/")
    split, name = (parts + [""])[:2] if len(parts) > 1 else ("test", parts[0])  # "macro_f1" = test/macro_f1
    task = parts[2] if len(parts) > 2 else (tasks[0] if tasks else "")
    ok = len(parts) <= 3 and any(name in f.get(split, {}).get(task, []) for f in found)
    if not ok:
        hint = f"unknown task {task!r}" if f"{split}/{name}" in names and task not in tasks else "not in the runs"
        raise TlbenchError(f"--metric {metric!r}: {hint}; available: {', '.join(names) or 'none'}, "
                           f"optionally with a task: /{' /'.join(tasks)} (default: {tasks[0] if tasks else '-'})")
    return Metric(split, name, task)


def resolve_metrics(runs: Sequence[Run], metric) -> list[Metric]:
    """``--metric a,b`` (or a list, or one :class:`Metric`) -> metrics, in that order, without repeats."""
    if isinstance(metric, Metric):
        return [metric]
    items = metric if isinstance(metric, (list, tuple)) else [x for x in (metric or "").split(",") if x.strip()]
    out = [m if isinstance(m, Metric) else resolve_metric(runs, m.strip()) for m in items] or [resolve_metric(runs, None)]
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- aggregating
def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def stats(values: Sequence[float]) -> tuple[int, Optional[float], Optional[float], Optional[float]]:
    """n, mean, sample std (ddof=1) and 95% CI half-width ``t(0.975, n-1) * std / sqrt(n)``."""
    n = len(values)
    if n == 0:
        return 0, None, None, None
    mean = sum(values) / n
    if n == 1:
        return 1, mean, None, None
    from scipy.stats import t

    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return n, mean, std, float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)


def features_cached(results: dict) -> bool:
    """Whether the run trained on stored features (the frozen part of its backbone ran once)."""
    fc = results.get("feature_cache")
    if isinstance(fc, dict):
        return bool(fc.get("applied"))
    return (results.get("time") or {}).get("feature_cache_s") is not None  # before the feature_cache record


def _resumed(r: Run) -> bool:
    try:
        with open(r.path / "train.log", encoding="utf-8", errors="replace") as f:
            return any("resumed from" in line for line in f)
    except OSError:
        return False


def _run_numbers(r: Run) -> dict:
    """A run's costs. ``total_s`` is its wall time, the feature pass included; a resumed run's
    ``results.json`` holds only its last session's, so there it is at least the recorded epochs
    plus the feature pass (``total_partial``). Images per second only where training read images."""
    res, time_ = r.results, r.results.get("time") or {}
    epochs = [e for e in res.get("epochs") or [] if isinstance(e, dict)]
    train_s = time_.get("train_s_per_epoch")
    cached = features_cached(res)
    items = _mean([(e.get("train") or {}).get("n") for e in epochs])
    feature_s = time_.get("feature_cache_s") if cached else None
    total = time_.get("total_s")
    partial = False
    if is_number(total):
        floor = sum(float(e.get("train_seconds") or 0) + float(e.get("val_seconds") or 0) for e in epochs)
        floor += feature_s or 0.0
        if floor > total or _resumed(r):
            total, partial = max(float(total), floor), True
    else:
        total = None
    fc = res.get("feature_cache") if isinstance(res.get("feature_cache"), dict) else {}
    return {"trainable": (res.get("params") or {}).get("trainable"), "best_epoch": res.get("best_epoch"),
            "train_s": train_s, "eval_s": time_.get("val_s_per_epoch"),
            "img_s": items / train_s if items and train_s and not cached else None,
            "total_s": total, "feature_s": feature_s, "total_partial": partial,
            "feature_reused": bool(cached and fc.get("reused"))}


def data_fingerprint(results: dict) -> str:
    """The data a run's numbers compare on: its splits before a training subset
    (``dataset.train_fraction``/``train_per_class`` draw another subset per seed, by design)."""
    subset = results.get("train_subset") or {}
    return str(subset.get("full_fingerprint") or results.get("dataset_fingerprint"))


def distinct_runs(runs: Sequence[Run]) -> tuple[list[Run], list[tuple[Run, Run]]]:
    """Each (config, seed) once: a run with the ``config_hash`` (which includes the seed) and the data
    of a run already kept (a copied folder, the same job run again elsewhere) is left out, so it is not
    counted as another seed. Returns the kept runs (the first of each, in the order given) and the
    ``(left out, the run it repeats)`` pairs. Runs without a ``config_hash`` are all kept."""
    kept, first, repeats = [], {}, []
    for r in runs:
        h = r.results.get("config_hash")
        key = (h, data_fingerprint(r.results)) if h else None
        if key is not None and key in first:
            repeats.append((r, first[key]))
            continue
        if key is not None:
            first[key] = r
        kept.append(r)
    return kept, repeats


def _group_warnings(label: str, runs: list[Run], by: Sequence[str], metrics: Sequence[Metric],
                    nums: Sequence[dict] = (), repeats: Sequence[tuple[Run, Run]] = ()) -> list[str]:
    out = []
    prints = sorted({data_fingerprint(r.results) for r in runs})
    if len(prints) > 1:
        out.append(f"{label}: runs trained on different data (dataset_fingerprint {', '.join(prints)}); "
                   f"their numbers are not comparable")
    params = sorted({(r.results.get("params") or {}).get("trainable") for r in runs}, key=str)
    if len(params) > 1:
        shown = ", ".join(f"{p:,}" if isinstance(p, int) else str(p) for p in params)
        out.append(f"{label}: trainable parameters differ within the group ({shown})")
    flat = [_flatten(r.config) for r in runs]
    keys = sorted({k for f in flat for k in f} - set(by) - set(NOT_A_GROUP))
    differ = [k for k in keys if not k.startswith("hydra.") and len({_ident(f.get(k, _MISSING)) for f in flat}) > 1]
    if differ:
        out.append(f"{label}: runs differ in keys not in --by: {', '.join(differ[:8])}"
                   f"{' ...' if len(differ) > 8 else ''} (add them to --by to split the group)")
    if repeats:
        shown = "; ".join(f"{r.path} (repeats {kept.path}, config_hash {r.results.get('config_hash')})"
                          for r, kept in repeats)
        out.append(f"{label}: {len(repeats)} run(s) left out: each repeats a config and seed already counted "
                   f"(same config_hash, seed included, and data), so n, std and CI are over distinct seeds: {shown}")
    for metric in metrics:
        lacking = [str(r.path) for r in runs if _metric_value(r, metric) is None]
        if lacking:
            out.append(f"{label}: {len(lacking)} run(s) have no {metric.label}, left out of the mean: "
                       f"{', '.join(lacking)}")
    limited = [r for r in runs if r.results.get("eval_limit")]
    if limited:
        shown = ", ".join(f"{r.path} ({(r.results['eval_limit'].get('test') or {}).get('n')} of "
                          f"{(r.results['eval_limit'].get('test') or {}).get('of')})" for r in limited[:4])
        out.append(f"{label}: {len(limited)} run(s) scored only part of their val/test splits "
                   f"(trainer.limit_eval_batches, a smoke setting): their metrics are not the test split's: "
                   f"{shown}{' ...' if len(limited) > 4 else ''}")
    partial = sum(1 for x in nums if x["total_partial"])
    if partial:
        out.append(f"{label}: {partial} run(s) were resumed; results.json times only their last session, so their "
                   f"total s counts the recorded epochs and feature pass (a lower bound)")
    reused = sum(1 for x in nums if x["feature_reused"])
    if reused:
        out.append(f"{label}: {reused} run(s) read their features from the feature store (computed by an "
                   f"earlier run); their feature pass s is the read, not the computation")
    cached = {x["img_s"] is None and x["train_s"] is not None for x in nums}
    if len(cached) > 1:
        out.append(f"{label}: some runs trained on stored features, some on images; train img/s is the mean "
                   f"of the image runs only")
    return out


def _metric_value(r: Run, metric: Metric) -> Optional[float]:
    v = ((r.results.get(metric.split) or {}).get(metric.task) or {}).get(metric.name)
    return float(v) if is_number(v) else None


def _sort_key(values: tuple):
    return [(2, "") if v is _MISSING else (0, v, "") if isinstance(v, (int, float)) and not isinstance(v, bool)
            else (1, 0, str(v)) for v in values]


def aggregate(runs: Sequence[Run], by=None, metric=None) -> list[Row]:
    """One :class:`Row` per distinct combination of the ``by`` config values, sorted by them."""
    if not runs:
        raise TlbenchError("no finished runs to compare")
    keys = resolve_by(runs, by)
    metrics = resolve_metrics(runs, metric)
    groups: dict = {}
    for r in runs:
        values = tuple(_get(r.config, k) for k in keys)
        groups.setdefault(tuple(map(_ident, values)), (values, []))[1].append(r)
    rows, members_of = [], []
    for values, members in sorted(groups.values(), key=lambda g: _sort_key(g[0])):
        members, repeats = distinct_runs(members)
        per_metric = []
        for m in metrics:
            vals = [v for v in (_metric_value(r, m) for r in members) if v is not None]
            per_metric.append(Stat(m, vals, *stats(vals)))
        nums = [_run_numbers(r) for r in members]
        row = Row(tuple(keys), values, [r.path for r in members], per_metric,
                  **{k: _mean(x[k] for x in nums) for k in ("trainable", "best_epoch", "train_s", "eval_s", "total_s",
                                                            "feature_s")},
                  train_img_s=_mean(x["img_s"] for x in nums), left_out=[r.path for r, _ in repeats])
        rows.append(row)
        members_of.append((members, nums, repeats))
    for row, shown in zip(rows, key_texts(rows)):
        row.shown = shown
    for row, (members, nums, repeats) in zip(rows, members_of):
        row.warnings = _group_warnings(row.label, members, keys, metrics, nums, repeats)
    return rows


# ----------------------------------------------------------------------------- command
class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise TlbenchError(f"tlbench compare: {message}\n{self.format_usage().strip()}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tlbench compare", description="Compare runs and sweeps: one row per config group, "
                "aggregated over seeds.")
    p.add_argument("paths", nargs="+", metavar="SWEEP_DIR|RUN_DIR",
                   help="run or sweep directories (searched recursively)")
    p.add_argument("--by", help="comma-separated config keys to group by, e.g. model,freeze or optim.lr "
                   "(default: the overridden keys that vary, except seed; else model.name)")
    p.add_argument("--metric", help="split/metric[/task], e.g. test/accuracy, val/macro_f1, test/accuracy/digit "
                   "(default test/accuracy of the first task); several, comma-separated: test/accuracy,test/macro_f1")
    p.add_argument("--format", help="md (default), csv or latex (default from --out's suffix)")
    p.add_argument("--out", help="write the table to FILE instead of stdout")
    p.add_argument("--plot", help="write a figure (.png, .pdf or .svg; several: a.png,a.pdf): each group's mean "
                   "with error bars and its runs as dots, against trainable parameters when they differ, "
                   "else by group; one panel per metric. When the last --by key is numeric (e.g. "
                   "dataset.train_fraction), a curve: one line per value of the other --by keys, the error "
                   "as a band")
    p.add_argument("--plot-kind", default="auto", choices=list(PLOT_KINDS),
                   help="auto (default): a curve when the last --by key is numeric with two or more values, "
                   "else bars; bars or curve to choose")
    p.add_argument("--xscale", default="auto", choices=list(XSCALES),
                   help="the x axis of a curve: auto (default: log when the values are positive and span more "
                   "than 10x), linear or log")
    p.add_argument("--errorbar", default="ci", choices=list(ERRORBARS),
                   help="the plot's error bars: ci = 95%% CI, the table's interval (default), std, none")
    p.add_argument("--size", default="two", help="the plot's size: one (3.5 in wide, one column of a paper), "
                   "two (7 in, both columns; default) or WIDTHxHEIGHT in inches")
    return p


def compare_main(argv: list[str]) -> int:
    """``tlbench compare ...``; user mistakes raise :class:`TlbenchError`."""
    try:
        args = _parser().parse_args(list(argv))
    except SystemExit as e:  # --help
        return int(e.code or 0)
    suffix = {".csv": "csv", ".tex": "latex", ".md": "md"}.get(Path(args.out).suffix.lower()) if args.out else None
    fmt = args.format or suffix or "md"
    if fmt not in FORMATS:
        raise TlbenchError(f"--format {fmt!r} is not known; choose one of 'md', 'csv', 'latex'")
    plots = plot_paths(args.plot) if args.plot else []  # bad names and sizes fail before any work
    if plots:
        figure_size(args.size)
    runs, problems = collect_runs(args.paths)
    if not runs:
        raise TlbenchError("no finished runs to compare (no results.json):\n" + "\n".join(p.line() for p in problems))
    rows = aggregate(runs, args.by, args.metric)
    text = render(rows, fmt, problems)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        from .record import atomic_write_text

        atomic_write_text(out, text)  # an existing FILE is replaced whole or kept, never truncated
        print(f"wrote {out} ({len(rows)} groups, {len(runs)} runs, {len(problems)} not finished)")
    else:
        sys.stdout.write(text)
    if FORMATS[fmt] == "csv" or args.out:
        for n in notes(rows, problems):
            print(n if n.startswith("not finished") else f"warning: {n}", file=sys.stderr)
    if plots:
        plot(rows, plots, args.errorbar, args.size, args.xscale, args.plot_kind)
        bars = f"mean ± {ERRORBARS[args.errorbar]}" if ERRORBARS[args.errorbar] else "none"
        print(f"wrote {', '.join(map(str, plots))} (error bars: {bars})")
    return 0
