"""The config's rules: a plain dict -> the typed :class:`~tlbench.config.Config` (OmegaConf checks
keys and types against the structured-config schema, ``schema()``), then ranges, choices and
cross-field rules (``validate``), and the checks that need the dataset's classes
(``check_tasks``). Every failure is a :class:`~tlbench.errors.TlbenchError` naming the key, the
bad value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field

from .config import (AUGMENTS, DATASETS, FOLDER_DATASETS, INIT_PARTS, LOGGERS, LOSSES, MONITORS,
                     OPTIMIZER_IMPLS, OPTIMIZERS, PIPELINES, PRECISIONS, SCHEDULERS, SWITCH_KEYS, SWITCHES,
                     Config, DatasetConfig, EvalConfig, OptimConfig, SchedConfig, is_reconstruction)
from . import registry
from .errors import TlbenchError, choices

SCHEMAS: dict[type, type] = {}


def schema(cls: type = Config) -> type:
    """The non-frozen twin of a config dataclass: the structured-config schema Hydra composes into
    (registered by ``cli.py``) and :func:`from_dict` checks with. ``ConfigSchema``,
    ``DatasetConfigSchema``, ... are module attributes (a sweep launcher pickles composed configs)."""
    if cls not in SCHEMAS:
        fields = []
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            sub = dataclasses.is_dataclass(tp)
            fields.append((f.name, schema(tp) if sub else tp,
                           field(default_factory=schema(tp)) if sub else field(default=f.default)))
        twin = dataclasses.make_dataclass(f"{cls.__name__}Schema", fields)
        twin.__module__ = __name__
        SCHEMAS[cls] = globals()[twin.__name__] = twin
    return SCHEMAS[cls]


def from_dict(cls, data: dict, prefix: str = ""):
    """The frozen ``cls`` from plain data, checked by OmegaConf against :func:`schema`: unknown
    keys and wrong types raise a TlbenchError naming the key, the value and what is valid."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(schema(cls)), data), resolve=True)
    except OmegaConfBaseException as e:
        raise TlbenchError(omegaconf_message(e, prefix)) from None
    return _frozen(cls, plain)


def _frozen(cls, data: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        value = data[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            value = _frozen(hints[f.name], value)
        kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def omegaconf_message(e: Exception, prefix: str = "") -> str:
    """An OmegaConf key or type error -> one line naming the key, the value and what is valid."""
    from omegaconf.errors import ValidationError

    key = ".".join(k for k in (prefix, str(getattr(e, "full_key", "") or "")) if k)
    section, _, name = key.rpartition(".")
    cls, tp = _lookup(key)
    value = getattr(e, "value", None)
    if key and cls is not None and tp is None:
        valid = ", ".join(f.name for f in dataclasses.fields(cls))
        return f"unknown key {key!r}; valid keys{f' of {section!r}' if section else ''} are: {valid}"
    if not isinstance(e, ValidationError) or tp is None:
        return (f"{key}: " if key else "") + " ".join(str(e).split("full_key:")[0].split())
    if value is not None and typing.get_origin(tp) is tuple and not name.endswith("]"):
        return f"{key}={value!r} must be a list, e.g. {key}=[{value}]"
    return f"{key}={'null' if value is None else repr(value)} has the wrong type: expected {_type_name(tp)}"


def _lookup(dotted: str):
    """(the section class holding ``dotted``, the field's type, a list entry's for ``head.hidden[0]``);
    the type is None for an unknown key, the class None where the path leaves Config."""
    section, _, last = dotted.rpartition(".")
    cls = Config
    for part in section.split(".") if section else []:
        cls = typing.get_type_hints(cls).get(part)
        if not dataclasses.is_dataclass(cls):
            return None, None
    tp = typing.get_type_hints(cls).get(last.split("[")[0])
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Optional[X] -> X
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    return cls, (typing.get_args(tp)[0] if tp and "[" in last else tp)


def _type_name(tp) -> str:
    if dataclasses.is_dataclass(tp):
        return "a group of settings (KEY=VALUE under it)"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_choice(key: str, value, valid) -> None:
    if value not in valid:
        raise TlbenchError(f"{key}={value!r} is not valid; choose one of {choices(valid)}")


def _check_range(key: str, value, lo=None, hi=None, lo_open=False, hi_open=False, why: str = "") -> None:
    if value is None:
        return
    why = f" ({why})" if why else ""
    if lo is not None and (value < lo or (lo_open and value == lo)):
        bound = f"> {lo}" if lo_open else f">= {lo}"
        raise TlbenchError(f"{key}={value!r} is out of range; it must be {bound}{why}")
    if hi is not None and (value > hi or (hi_open and value == hi)):
        bound = f"< {hi}" if hi_open else f"<= {hi}"
        raise TlbenchError(f"{key}={value!r} is out of range; it must be {bound}{why}")


def _check_sizes(key: str, values, what: str) -> None:
    """Every entry of a list of layer sizes is a positive integer."""
    for i, v in enumerate(values):
        if v < 1:
            raise TlbenchError(f"{key}={list(values)!r}: entry {i} is {v}; {what} must be positive integers")





def validate(cfg: Config) -> Config:
    """Ranges, choices and cross-field rules (types and unknown keys: the schema, ``to_config``)."""
    _validate_dataset(cfg.dataset)
    _validate_optim(cfg.optim, cfg.sched)
    _validate_trainer(cfg)
    _check_choice("freeze.bn", cfg.freeze.bn, ("eval", "train"))
    _check_range("freeze.gradual", cfg.freeze.gradual, 0)
    _check_range("head.dropout", cfg.head.dropout, 0.0, 1.0)
    _check_range("eval.bootstrap", cfg.eval.bootstrap, 0)
    _check_range("eval.calibration_bins", cfg.eval.calibration_bins, 1)
    for k in cfg.eval.topk:
        _check_range("eval.topk", k, 1)
    _check_range("model.dropout", cfg.model.dropout, 0.0, 1.0)
    _check_range("model.image_size", cfg.model.image_size, 8)
    _check_choice("model.in_chans", cfg.model.in_chans, (1, 3))
    for name in cfg.logger:
        if name not in LOGGERS:
            raise TlbenchError(f"logger=[{','.join(cfg.logger)}]: {name!r} is not a logger; choose from "
                               f"{choices(LOGGERS)} (default logger=[tensorboard,csv]; logger=[] for none)")
    _validate_more(cfg)
    return cfg


def _validate_dataset(d: DatasetConfig) -> None:
    _check_choice("dataset.name", d.name, DATASETS)
    _check_choice("dataset.augment", d.augment, AUGMENTS)
    _check_choice("dataset.class_weights", d.class_weights, ("none", "balanced"))
    _check_choice("dataset.on_bad_image", d.on_bad_image, ("error", "skip"))
    if d.val_fraction <= 0:  # no dataset has an official validation split: 0 failed only after loading,
        raise TlbenchError(  # with "0 of 1527 items is 0"
            f"dataset.val_fraction={d.val_fraction!r} is out of range; it must be > 0: the validation split picks "
            "the best epoch (checkpoints/best.pt, trainer.monitor, early stopping), so it needs items, e.g. "
            "dataset.val_fraction=0.15. No dataset has an official validation split to use instead (chest_xray's "
            "val/ folder joins the training pool)")
    _check_range("dataset.val_fraction", d.val_fraction, 0.0, 1.0)
    _check_range("dataset.test_fraction", d.test_fraction, 0.0, 1.0)
    if d.val_fraction + d.test_fraction >= 1.0:
        raise TlbenchError(
            f"dataset.val_fraction + dataset.test_fraction = {d.val_fraction + d.test_fraction:g} "
            "leaves no training data; the two must add up to less than 1 (e.g. 0.15 and 0.15)"
        )
    _check_range("dataset.limit_per_class", d.limit_per_class, 1)
    _check_range("dataset.train_fraction", d.train_fraction, 0.0, 1.0, lo_open=True,
                 why="the part of the training split kept; 1 keeps all, e.g. 0.1 for 10 %")
    _check_range("dataset.train_per_class", d.train_per_class, 1, why="training items kept per class")
    if d.train_per_class is not None and d.train_fraction != 1.0:
        raise TlbenchError(
            f"dataset.train_fraction={d.train_fraction:g} and dataset.train_per_class={d.train_per_class} both "
            "shrink the training split; set one of them (the other at its default: train_fraction=1.0, "
            "train_per_class=null)")
    _check_range("dataset.batch_size", d.batch_size, 1)
    _check_range("dataset.num_workers", d.num_workers, 0)
    check_dataset_keys(d)


def _readers(flag: str) -> list[str]:
    """The datasets whose ``registry.DATASETS`` entry has ``flag`` set (they read the key)."""
    return [n for n, e in registry.DATASETS.items() if getattr(e, flag)]


def _guess(root: str, readers: list[str]) -> str | None:
    """The dataset a root path names (``/data/cifar10`` -> ``cifar10``), if one does."""
    def squash(text: str) -> str:
        return "".join(c for c in text.lower() if c.isalnum())
    named = [n for n in readers if squash(n) in squash(root)]
    return max(named, key=len) if named else None


def check_dataset_keys(d: DatasetConfig, run_dir=None) -> None:
    """``dataset.root``, ``dataset.download`` and ``dataset.split`` set for a dataset that does
    not read them (``registry.DATASETS``: ``files``, ``downloads``, ``variants``) used to be
    ignored silently: ``dataset.root=/data/cifar10`` without ``dataset=cifar10`` trained on the
    default digits. ``run_dir``: the run ``tlbench eval`` re-evaluates (the message says so)."""
    name = d.name
    entry = registry.DATASETS.get(name)
    if entry is None:
        return
    cases = []
    if d.root is not None and str(d.root).strip() and not entry.files:
        readers = _readers("files")
        why = "reads no files (its images ship with scikit-learn)" if name == "sklearn_digits" else "reads no files"
        cases.append((f"dataset.root={d.root!r}", why, readers, _guess(str(d.root), readers), "dataset.root"))
    if d.download and not entry.downloads:
        why = ("has nothing to download (its images ship with scikit-learn)" if not entry.files
               else "has no downloader (put its files under dataset.root yourself: docs/datasets.md)")
        cases.append(("dataset.download=true", why, _readers("downloads"), None, "dataset.download"))
    if d.split is not None and not entry.variants:
        readers = _readers("variants")
        cases.append((f"dataset.split={d.split!r}", "has no variants to choose (dataset.split picks one, e.g. "
                      "EMNIST's balanced or letters)", readers, None, "dataset.split"))
    if not cases:
        return
    setting, why, readers, guess, key = cases[0]
    if run_dir is not None:
        raise TlbenchError(
            f"{setting} is set, but {run_dir} was trained on dataset={name}, which {why}, so it would be "
            f"ignored and the run evaluated on {name} all the same; a run is evaluated on data of its own "
            f"dataset ({key} applies to runs of {', '.join(readers)}). Leave {key} out, or set "
            f"{key}={'null' if key != 'dataset.download' else 'false'}")
    shown = f"dataset={name}" + (" (the default)" if name == DatasetConfig().name else "")
    mean = f"; did you mean dataset={guess}?" if guess else "."
    raise TlbenchError(
        f"{setting} is set, but {shown} {why}, so it would be ignored{mean} Datasets that read {key}: "
        f"{', '.join(readers)}. Choose one of them with dataset=NAME, or leave {key} out")


def _validate_optim(o: OptimConfig, s: SchedConfig) -> None:
    _check_choice("optim.name", o.name, OPTIMIZERS)
    _check_range("optim.lr", o.lr, 0.0, lo_open=True)
    _check_range("optim.head_lr", o.head_lr, 0.0, lo_open=True)
    _check_range("optim.weight_decay", o.weight_decay, 0.0)
    _check_range("optim.momentum", o.momentum, 0.0, 1.0)
    _check_range("optim.layer_decay", o.layer_decay, 0.0, 1.0, lo_open=True)
    _check_choice("sched.name", s.name, SCHEDULERS)
    _check_range("sched.step_size", s.step_size, 1)
    _check_range("sched.warmup_epochs", s.warmup_epochs, 0)


def _validate_trainer(cfg: Config) -> None:
    t = cfg.trainer
    _check_choice("trainer.precision", t.precision, PRECISIONS)
    _check_choice("trainer.cache_features", str(t.cache_features).lower(), ("auto", "true", "false"))
    _check_choice("trainer.feature_dtype", t.feature_dtype, ("float16", "float32"))
    _validate_speed(cfg)
    _check_choice("trainer.monitor", t.monitor, MONITORS)
    _check_range("trainer.max_epochs", t.max_epochs, 1)
    _check_range("trainer.batch_size", t.batch_size, 1)
    _check_range("trainer.devices", t.devices, 1)
    _check_choice("trainer.sync_bn", t.sync_bn, SWITCHES)
    _check_range("trainer.patience", t.patience, 1)
    _check_range("trainer.grad_clip", t.grad_clip, 0.0, lo_open=True)
    _check_range("trainer.limit_train_batches", t.limit_train_batches, 1)
    _check_range("trainer.limit_eval_batches", t.limit_eval_batches, 1)
    _check_range("trainer.num_threads", t.num_threads, 1)
    _check_range("trainer.divergence_factor", t.divergence_factor, 1.0, lo_open=True)
    _check_range("trainer.log_every_n_steps", t.log_every_n_steps, 1)
    dev = t.device
    if not (dev in ("auto", "cpu", "cuda", "mps") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise TlbenchError(f"trainer.device={dev!r} is not valid; use auto, cpu, cuda, cuda:N or mps")


def _validate_speed(cfg: Config) -> None:
    """The data path and the CUDA switches (``data/pipeline.py``, ``speed.py``)."""
    t = cfg.trainer
    _check_choice("dataset.pipeline", cfg.dataset.pipeline, PIPELINES)
    _check_range("dataset.tensor_budget_gb", cfg.dataset.tensor_budget_gb, 0.0)
    _check_choice("optim.impl", cfg.optim.impl, OPTIMIZER_IMPLS)
    for key in SWITCH_KEYS:
        _check_choice(f"trainer.{key}", str(getattr(t, key)).lower(), SWITCHES)
    if str(t.cudnn_benchmark).lower() == "true" and t.deterministic:
        raise TlbenchError("trainer.cudnn_benchmark=true picks convolution algorithms by timing them, which "
                           "trainer.deterministic=true forbids; set trainer.deterministic=false as well, or "
                           "leave trainer.cudnn_benchmark=auto")





def _validate_more(cfg: Config) -> None:
    """Values that used to pass and then train on nonsense (or fail with a traceback)."""
    d, m, o, s, f = cfg.dataset, cfg.model, cfg.optim, cfg.sched, cfg.freeze
    _check_range("seed", cfg.seed, 0, 2**32 - 1)
    _check_range("dataset.split_seed", d.split_seed, 0, 2**32 - 1)
    if d.classes and d.name not in FOLDER_DATASETS:
        raise TlbenchError(
            f"dataset.classes={list(d.classes)!r} does not apply to dataset={d.name!r}, whose classes are "
            f"fixed; it selects class folders of {', '.join(FOLDER_DATASETS)} only. Remove it")
    # the model
    _check_sizes("head.hidden", cfg.head.hidden, "hidden layer sizes")
    _check_sizes("model.hidden", m.hidden, "hidden layer sizes")
    _check_sizes("model.channels", m.channels, "channel counts")
    _check_range("model.convs_per_stage", m.convs_per_stage, 1)
    if m.name == "cnn" and not m.channels:
        raise TlbenchError("model.channels=[] leaves the cnn without a convolution; give one width per stage, "
                           "e.g. model.channels=[32,64]")
    if m.name == "mlp" and not m.hidden:
        raise TlbenchError("model.hidden=[] leaves the mlp without a layer; give at least one hidden size, "
                           "e.g. model.hidden=[256,128]")
    # the optimizer and the schedule
    if len(o.betas) != 2:
        raise TlbenchError(f"optim.betas={list(o.betas)!r} must have 2 values")
    for i, b in enumerate(o.betas):
        _check_range(f"optim.betas[{i}]", b, 0.0, 1.0, hi_open=True)
    if o.nesterov and o.name != "sgd":
        raise TlbenchError(f"optim.nesterov=true only applies to optim=sgd, not optim={o.name}")
    if o.nesterov and o.momentum == 0:
        raise TlbenchError(f"optim.nesterov=true needs optim.momentum > 0, but optim.momentum={o.momentum!r}")
    _check_range("sched.gamma", s.gamma, 0.0, 1.0, lo_open=True,
                 why="the lr is multiplied by it every step_size epochs")
    _check_range("sched.factor", s.factor, 0.0, 1.0, lo_open=True, hi_open=True,
                 why="the lr is multiplied by it on a plateau")
    _check_range("sched.patience", s.patience, 0)
    _check_range("sched.min_lr", s.min_lr, 0.0)
    epochs = cfg.trainer.max_epochs
    if s.name == "cosine" and s.warmup_epochs >= epochs:
        peak = epochs / (s.warmup_epochs + 1)  # optim.lr x (epoch + 1) / (warmup_epochs + 1) while warming up
        raise TlbenchError(
            f"sched.warmup_epochs={s.warmup_epochs} is out of range for trainer.max_epochs={epochs}: the warmup "
            f"raises the lr linearly and reaches optim.lr after warmup_epochs epochs, so the run would end "
            f"still warming up (the lr peaks at {peak:.0%} of optim.lr) and never decay; use sched.warmup_epochs "
            f"from 0 to {epochs - 1} (< trainer.max_epochs), or raise trainer.max_epochs above {s.warmup_epochs}")
    if f.groups and o.layer_decay is not None:
        raise TlbenchError(f"freeze.groups={list(f.groups)!r} and optim.layer_decay={o.layer_decay!r} both set block "
                           "learning rates; use one of them")
    _validate_task(cfg)





def _validate_task(cfg: Config) -> None:
    """The loss, the monitor and the transfer keys against the kind of run (classifier or cae)."""
    m, kind = cfg.model, "reconstruction" if is_reconstruction(cfg) else "classification"
    if cfg.loss not in LOSSES[kind]:
        other = "model=cae (reconstruction: mse, bce)" if kind == "classification" else "a classifier (cross_entropy)"
        raise TlbenchError(f"loss={cfg.loss!r} does not apply to model={m.name} ({kind}); choose one of "
                           f"{choices(LOSSES[kind])}, or {other}")
    _check_choice("model.init_part", m.init_part, INIT_PARTS)
    if m.init_part != "backbone" and not m.init_from:
        raise TlbenchError(f"model.init_part={m.init_part} says what model.init_from loads, but model.init_from is "
                           "not set; give model.init_from=RUN_DIR or drop model.init_part")
    _check_range("model.latent", m.latent, 1)
    if kind == "classification":
        return
    if not m.channels:
        raise TlbenchError("model.channels=[] leaves the cae without an encoder; give one width per stage, "
                           "e.g. model.channels=[32,64]")
    if cfg.trainer.monitor != "val/loss":
        raise TlbenchError(f"trainer.monitor={cfg.trainer.monitor!r} is a classification metric; a reconstruction "
                           "run (model=cae) has no labels to score and stops early on trainer.monitor=val/loss only")
    if cfg.dataset.class_weights != "none":
        raise TlbenchError(f"dataset.class_weights={cfg.dataset.class_weights!r} weights a classification loss; a "
                           "reconstruction run (model=cae) ignores labels: use dataset.class_weights=none")


def check_tasks(cfg: Config, tasks: dict[str, list[str]], available: dict[str, list[str]] | None = None) -> None:
    """Checks that need the dataset's tasks (``{task: class names}``), known once the data is
    read; ``build.build_everything`` (data + model + freeze plan, used by train and eval) has
    ``build_data`` call it once the tasks are selected, before splitting and decoding, and
    ``tlbench plan`` with the classes from the dataset's meta. ``available``: every task of the
    dataset (a message suggests one of them), ``tasks`` when not given.

    - ``eval.topk``: a k (> 1) that is not smaller than the number of classes of any task would
      be dropped silently (top-k of k classes is always 1). The default ``[1, 3]`` is exempt:
      it reports top-3 where a task has more than 3 classes.
    - ``eval.positive_class``: must name a class of every binary task; with no binary task it
      means nothing.
    - every task of a classifier has at least 2 classes (with one, every prediction is right:
      it trained, scored 1.0 and exited 0); the folder loaders refuse fewer than 2 class folders
      themselves, this catches the tasks they cannot judge (``handwritten_digits``' language
      task with ``dataset.classes=[Thai]``) and any other dataset.
    """
    if not is_reconstruction(cfg):
        _need_two_classes(cfg, tasks, available or tasks)
    e = cfg.eval
    sizes = ", ".join(f"task {t!r} has {len(n)} classes" for t, n in tasks.items())
    if tuple(e.topk) != EvalConfig().topk:
        most = max((len(n) for n in tasks.values()), default=0)
        for k in e.topk:
            if k > 1 and k >= most:
                raise TlbenchError(
                    f"eval.topk={list(e.topk)!r}: top-{k} needs more than {k} classes, but {sizes} "
                    f"(top-k of all classes is always 1); use values below {most}")
    if e.positive_class is not None:
        binary = {t: n for t, n in tasks.items() if len(n) == 2}
        if not binary:
            raise TlbenchError(
                f"eval.positive_class={e.positive_class!r} applies to binary (2-class) tasks, but {sizes}; "
                "remove it")
        for t, names in binary.items():
            if e.positive_class not in names:
                raise TlbenchError(
                    f"eval.positive_class={e.positive_class!r} is not a class of task {t!r}; choose one of "
                    f"{choices(names)}")


def _need_two_classes(cfg: Config, tasks: dict[str, list[str]], available: dict[str, list[str]]) -> None:
    d = cfg.dataset
    for task, names in tasks.items():
        if len(names) >= 2:
            continue
        found = f"{len(names)} class{'es' if len(names) != 1 else ''}" + (f" ({choices(names)})" if names else "")
        fixes = []
        if d.classes:
            what = "language" if d.name == "handwritten_digits" else "class"
            fixes.append(f"dataset.classes={list(d.classes)!r} keeps {len(names)} {what} folder{'s' * (len(names) != 1)} of "
                         f"dataset={d.name}: list at least 2")
        others = [t for t, n in available.items() if len(n) >= 2]
        if others:
            fixes.append(f"train {'the task' if len(others) == 1 else 'a task'} that has them: "
                         + ", ".join(f"dataset.task={t} ({len(available[t])} classes)" for t in others))
        raise TlbenchError(
            f"task {task!r} of dataset={d.name} has {found}; a classifier needs at least 2 classes per task "
            f"(with one, every prediction is right and the metrics mean nothing). {'; or '.join(fixes)}")


def to_config(data: dict) -> Config:
    """Build the frozen :class:`Config` from a plain (resolved) dict and validate it."""
    cfg = validate(from_dict(Config, {k: v for k, v in data.items() if k != "hydra"}))
    # true/True/yes-as-bool all mean "true"
    lowered = {k: str(getattr(cfg.trainer, k)).lower() for k in ("cache_features", *SWITCH_KEYS)}
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **lowered))


schema()  # from import on: a launcher's worker process unpickles configs that refer to them
