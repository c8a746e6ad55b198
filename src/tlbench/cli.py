"""The ``tlbench`` command. The only module that imports Hydra.

    tlbench [overrides]                 train (the default subcommand; -m for sweeps)
    tlbench eval RUN_DIR [split=test] [dataset.root=...]
    tlbench plan [overrides] [--json]   the model, its blocks and what trains
    tlbench list {datasets,models,freeze,optim,sched,trainer,experiment}
    tlbench download [model=...] [dataset=... dataset.root=...]   fill the caches (needs network)
    tlbench compare SWEEP_DIR|RUN_DIR... [--by model,freeze] [--metric test/accuracy]

User mistakes print one paragraph and exit with code 2 (``--debug`` or
``HYDRA_FULL_ERROR=1`` shows the traceback instead). ``--quiet`` / ``-q``: the console shows
warnings and the final summary only (no progress bars); ``--verbose`` / ``-v``: debug detail with
logger names and levels; ``train.log`` always has the full detail.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

from .errors import TlbenchError, choices

GROUPS = {"datasets": "dataset", "models": "model", "freeze": "freeze", "optim": "optim",
          "sched": "sched", "trainer": "trainer", "experiments": "experiment"}
GROUPS.update({v: v for v in list(GROUPS.values())})  # singular and plural both work
SUBCOMMAND_HELP = {
    "eval": """usage: tlbench eval RUN_DIR [split=test|val|train|all] [name=NAME] [dataset.KEY=VALUE ...]

Re-evaluate RUN_DIR's best checkpoint (checkpoints/best.pt) into RUN_DIR/eval_<name>/ with the
run's file contract (results.json, predictions/, reports, figures). The metrics are stored
under the split's name.
  split=test|val|train   one of the run's own splits (default test)
  split=all              every item of dataset.root (e.g. a held-out folder with the same classes)
  name=NAME              the output folder eval_NAME (default: the split)
  dataset.KEY=VALUE      dataset settings to change, e.g. dataset.root=/data/held_out

example: tlbench eval outputs/2026-11-30/12-00-00 dataset.root=/data/held_out split=all name=held_out""",
    "plan": """usage: tlbench plan [key=value ...] [--json]

Build the model and its freeze plan without training: blocks, parameter counts, what trains,
the optimizer groups and their learning rates, the tasks' classes, whether the pretrained
weights are cached (and where), and whether the frozen-prefix cache applies (with the GFLOPs
per image of the frozen and the trainable part). Reads no weights and no images: answers in
seconds, offline, and for cifar10/emnist/sklearn_digits even without the data. Takes the same
overrides as training.
  --json   the plan as JSON

example: tlbench plan model=efficientnet_lite0 freeze=last_block""",
    "list": """usage: tlbench list WHAT

The options of a config group, with their descriptions. WHAT: dataset(s), model(s), freeze,
optim, sched, trainer, experiment(s).

example: tlbench list models""",
    "download": """usage: tlbench download model=NAME [dataset=NAME dataset.root=DIR]

Fetch the model's pretrained weights into the torchvision / Hugging Face caches and the
dataset into dataset.root (CIFAR-10, EMNIST), on a machine with network, for compute nodes
that have none. Folder datasets have no downloader.

example: tlbench download model=deit_base_distilled dataset=cifar10 dataset.root=data/cifar10""",
}
HYDRA_INFO_FLAGS = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion",
                    "-sc", "--version", "--resolve", "-p", "--package")


def conf_dir() -> Path:
    """``conf/`` inside the installed wheel, else the source checkout's top-level ``conf/``."""
    here = Path(__file__).resolve().parent
    for cand in (here / "conf", here.parents[1] / "conf"):
        if (cand / "config.yaml").is_file():
            return cand
    raise TlbenchError(f"tlbench's config folder was not found (looked in {here / 'conf'}); reinstall tlbench")


def _debug(argv) -> bool:
    return "--debug" in argv or os.environ.get("HYDRA_FULL_ERROR") == "1"


CONSOLE_FLAGS = {"--quiet": "quiet", "-q": "quiet", "--verbose": "verbose", "-v": "verbose"}
# what the console shows (conf/hydra/job_logging/tlbench.yaml and hydra_logging/tlbench.yaml read these)
CONSOLE_ENV = {"quiet": {"TLBENCH_CONSOLE_LEVEL": "WARNING", "TLBENCH_HYDRA_LEVEL": "WARNING"},
               "verbose": {"TLBENCH_CONSOLE_LEVEL": "DEBUG", "TLBENCH_CONSOLE_FORMAT": "detailed"},
               "normal": {}}


def _console_mode(argv: list[str]) -> str:
    modes = {CONSOLE_FLAGS[a] for a in argv if a in CONSOLE_FLAGS}
    if len(modes) > 1:
        raise TlbenchError("--quiet and --verbose contradict each other; give one of them (or neither: "
                           "the compact console)")
    return modes.pop() if modes else "normal"


@contextlib.contextmanager
def console(mode: str):
    """The console for one command: the logging configs' environment variables (restored after),
    progress bars off when quiet, and for the subcommands Hydra does not configure (eval, plan, ...)
    tlbench's own log lines at the mode's level."""
    import logging

    from . import progress

    saved = {k: os.environ.get(k) for k in ("TLBENCH_CONSOLE_LEVEL", "TLBENCH_CONSOLE_FORMAT", "TLBENCH_HYDRA_LEVEL")}
    for k in saved:
        os.environ.pop(k, None)
    os.environ.update(CONSOLE_ENV[mode])
    progress.configure(console=mode != "quiet")
    handler = None
    if mode == "verbose" and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger("tlbench").addHandler(handler)
        logging.getLogger("tlbench").setLevel(logging.DEBUG)
    try:
        yield
    finally:
        if handler is not None:
            logging.getLogger("tlbench").removeHandler(handler)
        progress.configure(console=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug(argv)
    allow_code = "--allow-code" in argv
    try:
        mode = _console_mode(argv)
    except TlbenchError as e:
        print(f"tlbench: error: {e}", file=sys.stderr)
        return 2
    argv = [a for a in argv if a not in ("--debug", "--allow-code", *CONSOLE_FLAGS)]
    with console(mode):
        return _main(argv, debug, allow_code)


def _main(argv: list[str], debug: bool, allow_code: bool) -> int:
    try:
        if len(argv) > 1 and argv[0] in SUBCOMMAND_HELP and ("--help" in argv[1:] or "-h" in argv[1:]):
            print(SUBCOMMAND_HELP[argv[0]])
            return 0
        if argv and argv[0] == "list":
            return cmd_list(argv[1:])
        if argv and argv[0] == "eval":
            return cmd_eval(argv[1:])
        if argv and argv[0] == "plan":
            return cmd_plan(argv[1:])
        if argv and argv[0] == "download":
            from .build import download

            for line in download(compose(argv[1:])):
                print(line)
            return 0
        if argv and argv[0] == "compare":
            from .compare import compare_main

            return compare_main(argv[1:])
        if argv and argv[0] == "train":
            argv = argv[1:]
        return cmd_train(argv, debug, allow_code)
    except TlbenchError as e:
        if debug:
            raise
        print(f"tlbench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ----------------------------------------------------------------------------- composing
def _hydra_message(e: Exception) -> str:
    """Hydra/OmegaConf composition errors -> one paragraph naming the bad value and valid ones."""
    import re

    from omegaconf.errors import OmegaConfBaseException

    from .config import omegaconf_message

    cause = e  # Hydra wraps OmegaConf's key and type errors
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    if cause is not None:
        return omegaconf_message(cause)
    msg = str(e).strip()
    missing = re.search(r"Could not (?:find|load) '([\w/]+)/([^']+)'", msg)
    if missing:
        group, name = missing.groups()
        folder = conf_dir() / group
        valid = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        return f"{group}={name!r} is not a known {group}; choose one of {choices(valid)}"
    return " ".join(msg.split())


def _store_schema() -> None:
    """``conf/config.yaml`` starts from ``tlbench_schema``: the typed Config as Hydra's structured-config
    schema, so unknown keys, wrong types and missing values are composition errors, and every typed
    setting exists (``group.key=value`` works where the selected YAML omits the key)."""
    from hydra.core.config_store import ConfigStore

    from .config import schema

    ConfigStore.instance().store(name="tlbench_schema", node=schema())


def _hydra_compose(overrides: list[str], hydra_cfg: bool = False):
    """Hydra's compose API (no run dir, no logging); composition errors -> TlbenchError."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    _store_schema()
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=canonical(overrides), return_hydra_config=hydra_cfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise TlbenchError(f"bad configuration: {_hydra_message(e)}") from None


def _typed(dcfg):
    """The composed OmegaConf config (its ``hydra`` node left out) -> the typed, validated Config."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import to_config

    try:
        data = OmegaConf.to_container(OmegaConf.masked_copy(dcfg, [k for k in dcfg if k != "hydra"]), resolve=True)
    except OmegaConfBaseException as e:
        raise TlbenchError(f"bad configuration: {_hydra_message(e)}") from None
    return to_config(data)


def compose(overrides: list[str]):
    """Compose the config and return the typed, validated Config."""
    return _typed(_hydra_compose(overrides))


def canonical(overrides: list[str]) -> list[str]:
    """``+experiment=NAME`` (the older spelling) is ``experiment=NAME``: the experiment group is in
    the defaults list (before trainer, so ``trainer=smoke`` also shrinks presets)."""
    return [o[1:] if o.startswith("+experiment=") else o for o in overrides]


def _expand_sweep(overrides: list[str]) -> Optional[list[list[str]]]:
    """All jobs of a ``-m`` sweep (basic sweeper syntax: ``a,b``, ``range()``, ``choice()``), to
    validate them before any runs; a later value of a key replaces an earlier one, as in Hydra's
    basic sweeper (the command line replaces a preset's axis). A syntax error is the user's (exit 2);
    ``None`` when the sweep uses a sweeper plugin's own syntax (e.g. Optuna's ``interval()``), which
    that plugin checks."""
    import itertools
    import logging

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise TlbenchError(f"bad override: {' '.join(str(e).split('See https')[0].split())}; "
                           f"write key=value, a sweep as key=a,b,c (no empty values)") from None
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if o.is_interval_sweep():
                logging.getLogger(__name__).info("%s is swept by the sweeper plugin; it checks the values itself", key)
                return None
            axes[key] = [f"{key}={v}" for v in o.sweep_string_iterator()]
        else:
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
    return [list(job) for job in itertools.product(*axes.values())]


def sweep_jobs(overrides: list[str], hc=None) -> Optional[list[list[str]]]:
    """The jobs ``tlbench -m OVERRIDES`` runs: the preset's ``hydra.sweeper.params`` grid with the
    command line's values (``None`` for a sweeper plugin's own syntax, see :func:`_expand_sweep`)."""
    overrides = canonical(overrides)
    hc = hc or _hydra_compose(_first_values(overrides), hydra_cfg=True)
    params = hc.hydra.sweeper.get("params") or {}
    return _expand_sweep([f"{k}={v}" for k, v in params.items()] + overrides)


def _validate(argv: list[str]) -> None:
    """Compose every job (a preset's ``hydra.sweeper.params`` included) and check that the run
    or sweep folder can be written, before anything runs."""
    from .record import check_writable

    overrides = [a for a in argv if not a.startswith("-") and not a.startswith("hydra")]
    hydra_overrides = [a for a in argv if a.startswith(("hydra.", "hydra/"))]
    if not ("-m" in argv or "--multirun" in argv):
        hc = _hydra_compose(overrides + hydra_overrides, hydra_cfg=True)
        check_writable(Path(str(hc.hydra.run.dir)), "the run directory")
        _typed(hc)
        return
    hc = _hydra_compose(_first_values(overrides) + hydra_overrides, hydra_cfg=True)
    check_writable(Path(str(hc.hydra.sweep.dir)), "the sweep directory")
    for job in sweep_jobs(overrides, hc) or []:
        compose(job)


def _first_values(overrides: list[str]) -> list[str]:
    """``key=a,b`` -> ``key=a``: one job's worth of overrides (to see the config's structure);
    sweeper functions such as ``interval(...)`` are left out."""
    out = []
    for o in overrides:
        key, _, val = o.partition("=")
        if "(" in val:
            continue
        out.append(f"{key}={val.split(',')[0]}" if "," in val and "[" not in val else o)
    return out


def _resume_overrides(argv: list[str]) -> list[str]:
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
    import yaml

    original = [o for o in yaml.safe_load(saved.read_text()) or []
                if not o.lstrip("+").startswith(("trainer.resume=", "hydra.run.dir="))]
    rest = [a for a in argv if a not in res]
    return original + rest + [f"trainer.resume={run_dir}", f"hydra.run.dir={run_dir}"]


def _refuse_code(argv: list[str], allow_code: bool) -> None:
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


# ----------------------------------------------------------------------------- train
def cmd_train(argv: list[str], debug: bool, allow_code: bool = False) -> int:
    argv = canonical(_resume_overrides(argv))
    _refuse_code(argv, allow_code)
    if not any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in argv):
        _validate(argv)
    _store_schema()
    import hydra

    task = _make_task(debug)
    entry = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)
    old = sys.argv
    sys.argv = [old[0] if old else "tlbench", *argv]
    try:
        entry()
    finally:
        sys.argv = old
    return 0


def _make_task(debug: bool):
    def task(dcfg) -> Optional[float]:
        from hydra.core.hydra_config import HydraConfig

        from . import dist
        from .run import train

        hc = HydraConfig.get()
        run_dir = Path(hc.runtime.output_dir)
        sweep_env = os.environ.get("TLBENCH_SWEEP_DIR")  # a sweep job that trainer.devices=N started
        sweeping = str(hc.mode) == "RunMode.MULTIRUN" or bool(sweep_env)
        sweep_dir = Path(hc.sweep.dir) if str(hc.mode) == "RunMode.MULTIRUN" else (Path(sweep_env) if sweep_env else None)
        try:
            cfg = _typed(dcfg)
            if sweeping and cfg.sweep.skip_finished and not sweep_env:
                from .record import sweep_job

                cfg, results = sweep_job(cfg, run_dir, sweep_dir)
            else:
                results = None
            if results is None and cfg.trainer.devices > 1 and not dist.launched():
                return _launch(cfg, hc, run_dir, sweep_dir, debug)
            world = dist.init(cfg.trainer.device)
            try:
                if world.size > 1:
                    dist.check_batch(cfg.batch_size)
                    run_dir = _shared_run_dir(run_dir)
                results = results or train(cfg, run_dir, record=_record(dcfg, hc), sweeping=sweeping)
            finally:
                dist.shutdown()
        except TlbenchError as e:
            if debug:
                raise
            print(f"tlbench: error: {e}", file=sys.stderr)
            sys.exit(2)
        except _interrupt_types() as e:
            print(f"tlbench: {e}; resume with: tlbench trainer.resume={run_dir}", file=sys.stderr)
            sys.exit(128 + e.signum)
        if not world.main:
            return None
        _print_summary(run_dir, results, sweeping, sweep_dir)
        return _objective(results)

    return task


def _objective(results: dict) -> float:
    """The objective for sweepers (validation, never test; higher is better): accuracy, or a
    reconstruction's PSNR."""
    first = next(iter(results["val"].values()))
    return float(first["accuracy"] if "accuracy" in first else first["psnr"])


def _shared_run_dir(run_dir: Path) -> Path:
    """DDP: every rank composed its own ``hydra.run.dir`` (timestamps may differ by a second);
    all use rank 0's, and a rank's own empty directory is removed."""
    from . import dist

    shared = Path(dist.broadcast(str(run_dir)))
    if shared != run_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()
    return shared


def _launch(cfg, hc, run_dir: Path, sweep_dir: Optional[Path], debug: bool) -> Optional[float]:
    """``trainer.devices=N`` outside torchrun: the same run on N processes (``dist.launch``), into
    this run directory; a sweep job keeps its sweep's rules (val only on the console)."""
    import json

    from . import dist

    dist.check_batch(cfg.batch_size, cfg.trainer.devices)
    overrides = [o for o in hc.overrides.task if not o.lstrip("+").startswith("trainer.resume=")]
    if cfg.trainer.resume:
        overrides.append("trainer.resume=auto")
    overrides += [f"hydra.run.dir={run_dir}"] + (["--debug"] if debug else [])
    code = dist.launch(cfg.trainer.devices, overrides, {"TLBENCH_SWEEP_DIR": str(sweep_dir)} if sweep_dir else None)
    if code:
        sys.exit(code)
    return _objective(json.loads((run_dir / "results.json").read_text()))


def _record(dcfg, hc) -> dict[str, str]:
    """The ``.hydra/`` files of a run (Hydra's layout), written by ``run.train`` only once the run
    starts: the resolved config, the overrides typed, and Hydra's own config."""
    from omegaconf import OmegaConf

    return {"config.yaml": OmegaConf.to_yaml(dcfg, resolve=True),
            "overrides.yaml": OmegaConf.to_yaml(hc.overrides.task),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": OmegaConf.to_container(hc)}))}


def _interrupt_types():
    from .engine import Interrupted

    return Interrupted


def _print_summary(run_dir: Path, results: dict, sweeping: bool = False, sweep_dir: Optional[Path] = None) -> None:
    """After a run: its test accuracy, run dir and TensorBoard command; a sweep's trial shows its
    validation metrics only (evaluate.run_summary_lines)."""
    from .evaluate import run_summary_lines

    for line in run_summary_lines(run_dir, results, sweeping, sweep_dir):
        print(line)


# ----------------------------------------------------------------------------- list / eval / plan
def cmd_list(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in GROUPS:
        given = f"{' '.join(argv)!r} is not a config group; " if argv else ""
        raise TlbenchError(f"tlbench list: {given}usage: tlbench list WHAT, where WHAT is one of {choices(GROUPS)}")
    folder = conf_dir() / GROUPS[argv[0]]
    for path in sorted(folder.glob("*.yaml")):
        print(f"{path.stem:24s} {_description(path)}")
    return 0


def _description(path: Path) -> str:
    """The first paragraph of the comment block at the top of a config file, as one line (whole
    sentences; indented example commands and what follows them are left to the file)."""
    lines = []
    for ln in path.read_text().splitlines():
        if ln.startswith("# @"):
            continue
        if not ln.startswith("#") or ln.startswith("#  ") or not ln.strip("# "):
            break
        lines.append(ln.lstrip("#").strip())
    return " ".join(x for x in lines if x)


def cmd_eval(argv: list[str]) -> int:
    from .evaluate import evaluate_run

    if not argv or "=" in argv[0]:
        raise TlbenchError("usage: tlbench eval RUN_DIR [split=test|val|train] [name=NAME] [dataset.KEY=VALUE ...]")
    run_dir, rest = Path(argv[0]), argv[1:]
    opts = dict(a.split("=", 1) for a in rest if not a.startswith("dataset.") and "=" in a)
    bad = sorted(set(opts) - {"split", "name"})
    if bad:
        raise TlbenchError(f"tlbench eval: unknown option {bad[0]!r}; valid: split=, name=, dataset.<key>=")
    import yaml

    updates = {a.split("=", 1)[0][len("dataset."):]: yaml.safe_load(a.split("=", 1)[1])
               for a in rest if a.startswith("dataset.")}
    out = evaluate_run(run_dir, opts.get("split", "test"), updates, opts.get("name"))
    from .evaluate import summary_lines

    for line in summary_lines(out):
        print(line)
    print(f"evaluation written to {out}")
    return 0


def cmd_plan(argv: list[str]) -> int:
    from .plan import plan_text

    as_json = "--json" in argv
    cfg = compose([a for a in argv if a != "--json"])
    print(plan_text(cfg, as_json))
    return 0


def main_exit() -> None:
    """Console-script entry point (a closed pipe, e.g. ``| head``, ends quietly)."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main_exit()
