"""The ``tlbench`` command. With ``compose.py`` (Hydra -> Config) the only modules that import Hydra.

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

from .compose import canonical, compose, conf_dir, refuse_code, resume_overrides, store_schema, typed, validate_argv
from .errors import TlbenchError, choices

GROUPS = {"datasets": "dataset", "models": "model", "freeze": "freeze", "optim": "optim",
          "sched": "sched", "trainer": "trainer", "experiments": "experiment"}
GROUPS.update({v: v for v in list(GROUPS.values())})  # singular and plural both work
SUBCOMMAND_HELP = {
    "eval": """usage: tlbench eval RUN_DIR [split=test|val|train|all] [name=NAME] [dataset.KEY=VALUE ...]

Re-evaluate RUN_DIR's best checkpoint (checkpoints/best.pt) into RUN_DIR/eval_<name>/:
results.json (the metrics of the one split evaluated, under the split's name), predictions/,
reports, figures/, splits.json and eval.log. Not a run directory: no checkpoints, tb/ or
second split (README: "An eval folder is not a run directory").
  split=test|val|train   one of the run's own splits (default test)
  split=all              every item of dataset.root (e.g. a held-out folder with the same classes)
  name=NAME              the output folder eval_NAME (default: the split); letters, digits,
                         '_', '-', '.', no '/' and no '..'
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


# ----------------------------------------------------------------------------- train
def cmd_train(argv: list[str], debug: bool, allow_code: bool = False) -> int:
    argv = canonical(resume_overrides(argv))
    refuse_code(argv, allow_code)
    check_hydra_modes(argv)
    if not any(a.split("=")[0] in HYDRA_INFO_FLAGS for a in argv):
        validate_argv(argv)
    store_schema()
    import hydra

    task = _make_task(debug, argv)
    entry = hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")(task)
    old = sys.argv
    sys.argv = [old[0] if old else "tlbench", *argv]
    try:
        entry()
    finally:
        sys.argv = old
    return 0


HYDRA_MODES = {"-m": "-m", "--multirun": "-m", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info", "-i": "--info",
               "--shell-completion": "--shell-completion", "-sc": "--shell-completion", "--run": "--run", "-r": "--run"}


def check_hydra_modes(argv: list[str]) -> None:
    """Hydra takes one of -m, --cfg, --info, --shell-completion, --run (and --resolve only with
    --cfg); it says so with a ValueError traceback (exit 1): refused here in one line (exit 2)."""
    given = []
    for a in argv:
        flag = a.split("=", 1)[0]
        mode = HYDRA_MODES.get(flag)
        if mode and mode not in given:
            given.append(mode)
    if "--resolve" in argv and "--cfg" not in given and not {"--help", "-h"} & set(argv):
        raise TlbenchError("--resolve only works with --cfg (e.g. tlbench --cfg job --resolve)")
    if len(given) < 2:
        return
    hint = ""
    if "-m" in given and "--cfg" in given:
        import shlex

        from .compose import first_values

        overrides = [a for a in argv if "=" in a and not a.startswith("-")]
        flags = [a for a in argv if a not in overrides and HYDRA_MODES.get(a) != "-m"]
        try:
            hint = f"; e.g. the first job's config: tlbench {shlex.join(first_values(overrides) + flags)}"
        except TlbenchError:
            pass
        hint = f". --cfg prints one run's config: drop -m and give one value per key{hint}"
    raise TlbenchError(f"{' and '.join(given)} cannot be combined: give one of -m (a sweep), --cfg (print the "
                       f"config), --info, --shell-completion, --run{hint}")


def _make_task(debug: bool, argv: list[str]):
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
            cfg = typed(dcfg)
            if sweeping and cfg.sweep.skip_finished and not sweep_env:
                from .record import sweep_job

                cfg, results, run_dir = sweep_job(cfg, run_dir, sweep_dir)  # a skipped job: where it finished
            else:
                results = None
            if results is None and cfg.trainer.devices > 1 and not dist.launched():
                return _launch(cfg, hc, run_dir, sweep_dir, debug)
            world = dist.init(cfg.trainer.device)
            try:
                if world.size > 1:
                    dist.check_batch(cfg.batch_size)
                    run_dir = dist.shared_run_dir(run_dir)
                results = results or train(cfg, run_dir, record=_record(dcfg, hc), sweeping=sweeping)
            finally:
                dist.shutdown()
        except TlbenchError as e:
            if debug:
                raise
            print(f"tlbench: error: {e}", file=sys.stderr)
            sys.exit(2)
        except _interrupt_types() as e:
            print(f"tlbench: {e}; {_resume_hint(argv, hc, run_dir, sweep_dir, cfg)}", file=sys.stderr)
            sys.exit(128 + e.signum)
        if not world.main:
            return None
        _print_summary(run_dir, results, sweeping, sweep_dir)
        return _objective(results)

    return task


def _resume_hint(argv: list[str], hc, run_dir: Path, sweep_dir: Optional[Path], cfg) -> str:
    """How to continue after Ctrl-C. A run: ``trainer.resume=RUN_DIR``. A basic sweep (skipping
    finished jobs): the same ``-m`` command in the same sweep folder, which skips the finished
    jobs, resumes this one and runs the rest (``trainer.resume`` would continue this job only)."""
    import shlex

    job = f"tlbench trainer.resume={Path(run_dir).resolve()}"
    basic = "BasicSweeper" in str(hc.sweeper.get("_target_", ""))
    if sweep_dir is None or str(hc.mode) != "RunMode.MULTIRUN" or not basic or not cfg.sweep.skip_finished:
        return f"resume with: {job}"
    again = [a for a in argv if not a.startswith("hydra.sweep.dir=")] + [f"hydra.sweep.dir={Path(sweep_dir).resolve()}"]
    return (f"continue the sweep (finished jobs are skipped, this one resumes, the rest run) with the same "
            f"command:\n  tlbench {shlex.join(again)}\n(this job alone: {job})")


def _objective(results: dict) -> float:
    """The objective for sweepers (validation, never test; higher is better): accuracy, or a
    reconstruction's PSNR."""
    first = next(iter(results["val"].values()))
    return float(first["accuracy"] if "accuracy" in first else first["psnr"])


def _launch(cfg, hc, run_dir: Path, sweep_dir: Optional[Path], debug: bool) -> Optional[float]:
    """``trainer.devices=N`` outside torchrun: the same run on N processes (``dist.launch_run``)."""
    import json

    from . import dist

    code = dist.launch_run(cfg, list(hc.overrides.task), run_dir, sweep_dir, debug)
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
