"""Hydra -> the typed :class:`~tlbench.config.Config`: composing ``conf/`` with the command
line's overrides, reformatting Hydra/OmegaConf errors into one paragraph, expanding and checking
every job of a sweep before any runs, replaying a run's overrides for ``trainer.resume``, refusing
overrides that run code. With ``cli.py`` the only modules that import Hydra.
"""

from __future__ import annotations

import itertools
import logging
import re
from pathlib import Path
from typing import Optional

import yaml

from .errors import TlbenchError, choices
from .validation import omegaconf_message, schema, to_config

log = logging.getLogger(__name__)


def conf_dir() -> Path:
    """``conf/`` inside the installed wheel, else the source checkout's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parents[1] / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise TlbenchError(f"tlbench's config folder was not found (looked in {here / 'conf'}); reinstall tlbench")


def hydra_message(e: Exception) -> str:
    """Hydra/OmegaConf composition errors -> one paragraph naming the bad value and valid ones."""
    from omegaconf.errors import OmegaConfBaseException

    cause = e  # Hydra wraps OmegaConf's key and type errors
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return omegaconf_message(cause)
    msg = str(e).strip()
    missing = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if missing:
        group, name = missing.groups()
        return f"{group}={name!r} is not a known {group}; choose one of {choices(group_options(group))}"
    return " ".join(msg.split())


def store_schema() -> None:
    """``conf/config.yaml`` starts from ``tlbench_schema``: the typed Config as Hydra's structured-config
    schema, so unknown keys, wrong types and missing values are composition errors, and every typed
    setting exists (``group.key=value`` works where the selected YAML omits the key)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="tlbench_schema", node=schema())


def hydra_compose(overrides: list[str], hydra_cfg: bool = False):
    """Hydra's compose API (no run dir, no logging); composition errors -> TlbenchError."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    store_schema()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return _compose(config_name="config", overrides=canonical(overrides), return_hydra_config=hydra_cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise TlbenchError(f"bad configuration: {hydra_message(e)}") from None


def typed(dcfg):
    """The composed OmegaConf config (its ``hydra`` node left out) -> the typed, validated Config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        data = OmegaConf.to_container(OmegaConf.masked_copy(dcfg, [k for k in dcfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as e:
        raise TlbenchError(f"bad configuration: {hydra_message(e)}") from None
    return to_config(data)


def compose(overrides: list[str]):
    """Compose the config and return the typed, validated Config."""
    return typed(hydra_compose(overrides))


def canonical(overrides: list[str]) -> list[str]:
    """``+experiment=NAME`` (the older spelling) is ``experiment=NAME``: the experiment group is in
    the defaults list (before trainer, so ``trainer=smoke`` also shrinks presets)."""
    return [o[1:] if o.startswith("+experiment=") else o for o in overrides]


def _config_loader():
    """Hydra's config loader on ``conf/`` with Hydra's own and its installed plugins' configs (what
    a ``hydra.main`` run sees: ``hydra/launcher=joblib`` comes from the joblib plugin)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.utils import create_config_search_path

    store_schema()
    return ConfigLoaderImpl(config_search_path=create_config_search_path(str(conf_dir())))


def group_options(group: str) -> list[str]:
    """Every option of a config group that works: tlbench's ``conf/`` and, for ``hydra/...``
    groups, Hydra's and the installed plugins' (``hydra/launcher``: basic, joblib, slurm, ...)."""
    try:
        return sorted(_config_loader().get_group_options(group))
    except Exception:  # noqa: BLE001 - an error message must not fail: fall back to conf/
        folder = conf_dir() / group
        return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def parse_overrides(overrides: list[str]):
    """The overrides as Hydra's sweepers read them (its own parser, with a config loader on
    ``conf/`` so that ``group=glob(...)`` lists the group's options); a syntax error is the
    user's (exit 2)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create(config_loader=_config_loader()).parse_overrides(overrides)
    except HydraException as e:
        raise TlbenchError(f"bad override: {' '.join(str(e).split('See https')[0].split())}; "
                           f"write key=value, a sweep as key=a,b,c (no empty values)") from None


def _values(o) -> list[str]:
    """Every value of one swept override, as override strings (Hydra's basic sweeper's own
    enumeration: ``a,b``, ``[1],[2]``, ``choice()``, ``range()``, ``glob()``, ``shuffle()``)."""
    from hydra.errors import HydraException

    key = o.get_key_element()
    try:
        values = [f"{key}={v}" for v in o.sweep_string_iterator()]
    except HydraException as e:
        raise TlbenchError(f"bad override {o.input_line!r}: {' '.join(str(e).split())}") from None
    if not values:
        raise TlbenchError(f"{o.input_line!r} sweeps over no value (a glob() that matches no option of "
                           f"{key.lstrip('+~')}?); give at least one value")
    return values


def expand_sweep(overrides: list[str]) -> Optional[list[list[str]]]:
    """All jobs of a ``-m`` sweep (basic sweeper syntax: ``a,b``, ``[1],[2]``, ``range()``,
    ``choice()``, ``glob()``), to validate them before any runs; a later value of a key replaces
    an earlier one, as in Hydra's basic sweeper (the command line replaces a preset's axis). A
    syntax error is the user's (exit 2); ``None`` when the sweep uses a sweeper plugin's own syntax
    (e.g. Optuna's ``interval()``), which that plugin checks."""
    axes: dict[str, list[str]] = {}
    for o in parse_overrides(overrides):
        key = o.get_key_element()
        if o.is_sweep_override():
            if o.is_interval_sweep():
                log.info("%s is swept by the sweeper plugin; it checks the values itself", key)
                return None
            axes[key] = _values(o)
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*axes.values())]


def sweep_jobs(overrides: list[str], hc=None) -> Optional[list[list[str]]]:
    """The jobs ``tlbench -m OVERRIDES`` runs: the preset's ``hydra.sweeper.params`` grid with the
    command line's values (``None`` for a sweeper plugin's own syntax, see :func:`expand_sweep`)."""
    overrides = canonical(overrides)
    hc = hc or hydra_compose(first_values(overrides), hydra_cfg=True)
    params = hc.hydra.sweeper.get("params") or {}
    return expand_sweep([f"{k}={v}" for k, v in params.items()] + overrides)


def validate_argv(argv: list[str]) -> None:
    """Compose every job (a preset's ``hydra.sweeper.params`` included) and check that the run
    or sweep folder can be written, before anything runs."""
    from .record import check_writable  # lazy: it imports torch, which list/--help never need

    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    hydra_overrides = [a for a in argv if a.startswith(("hydra.", "hydra/"))]
    if not ("-m" in argv or "--multirun" in argv):
        hc = hydra_compose(overrides + hydra_overrides, hydra_cfg=True)
        check_writable(Path(str(hc.hydra.run.dir)), "the run directory")
        typed(hc)
        return
    hc = hydra_compose(first_values(overrides) + hydra_overrides, hydra_cfg=True)
    check_writable(Path(str(hc.hydra.sweep.dir)), "the sweep directory")
    jobs = sweep_jobs(overrides, hc) or []
    configs = [(job, _job_config(i, len(jobs), job)) for i, job in enumerate(jobs)]
    from .plan import check_jobs  # lazy: torch and the model libraries

    check_jobs(configs, remote="slurm" in str(hc.hydra.launcher.get("_target_", "")).lower())


def _job_config(i: int, n: int, job: list[str]):
    """One sweep job's Config; a refusal names the job."""
    try:
        return compose(job)
    except TlbenchError as e:
        raise TlbenchError(f"sweep job #{i} of {n} ({' '.join(job)}): {e}") from None


def first_values(overrides: list[str]) -> list[str]:
    """``key=a,b`` -> ``key=a``: one job's worth of overrides (to see the config's structure), each
    sweep's first value as Hydra's parser enumerates it (so ``key=[1],[2]`` -> ``key=[1]``, and
    ``choice()``, ``range()``, ``glob()`` alike); a sweeper plugin's ``interval(...)`` is left out."""
    out = []
    for o in parse_overrides(overrides):
        if not o.is_sweep_override():
            out.append(o.input_line)
        elif not o.is_interval_sweep():
            out.extend(_values(o)[:1])
    return out


def resume_overrides(argv: list[str]) -> list[str]:
    """``trainer.resume=RUN_DIR``: rerun in that dir with its original overrides."""
    res = [a for a in argv if a.lstrip("+").startswith("trainer.resume=")]
    if not res:
        return argv
    target = res[-1].split("=", 1)[1]
    if target in ("auto", "null", ""):
        return argv
    run_dir = Path(target).expanduser().resolve()
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        raise TlbenchError(f"trainer.resume={target}: {run_dir} is not a tlbench run directory (no .hydra/overrides.yaml)")
    original = [o for o in yaml.safe_load(saved.read_text()) or []
                if not o.lstrip("+").startswith(("trainer.resume=", "hydra.run.dir="))]
    rest = [a for a in argv if a not in res]
    return original + rest + [f"trainer.resume={run_dir}", f"hydra.run.dir={run_dir}"]


def refuse_code(argv: list[str], allow_code: bool) -> None:
    """``_target_`` values and ``hydra.callbacks`` make Hydra import and call arbitrary code: refused
    on the command line and in replayed overrides (``trainer.resume``) unless ``--allow-code``."""
    if allow_code:
        return
    for a in argv:
        key = a.split("=", 1)[0].lstrip("+~")
        if "_target_" in a or key.startswith(("hydra.callbacks", "hydra/callbacks")):
            raise TlbenchError(
                f"refusing the override {a!r}: '_target_' and hydra.callbacks make Hydra import and run code "
                f"named in configuration; tlbench's settings never need them. If you wrote it yourself and "
                f"trust it, add --allow-code")
