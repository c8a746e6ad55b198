"""Where a run reports its metrics besides ``results.json``: ``logger=[tensorboard,csv]`` by default.

- ``tensorboard``: events in ``run_dir/tb/`` (scalars per epoch and every N steps, images,
  figures, the full hyperparameter set with the final metrics in HPARAMS). A job of a sweep also
  links its ``tb/`` as ``SWEEP_DIR/tb/<overrides>``, so ``tensorboard --logdir SWEEP_DIR/tb``
  names each run by its overrides (TensorBoard names a run by its folder relative to
  ``--logdir``; the run directory itself keeps its ``tb/``).
- ``csv``: ``metrics.csv``, one row per epoch (``tracking.write_epochs_csv``).
- ``mlflow`` (``pip install 'tlbench[mlflow]'``: mlflow-skinny): a local file store
  ``file:<run_dir>/mlruns`` (or ``<logger_dir>/mlruns``), experiment ``tlbench``, the run named
  by its overrides: params = the hyperparameters, metrics per epoch/step, the final metrics,
  ``figures/`` as artifacts. Never a server: browse with
  ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:RUN_DIR/mlruns``.
- ``wandb`` (``pip install 'tlbench[wandb]'``): always offline (``<run_dir>/wandb/offline-run-*``,
  or under ``logger_dir``); upload later with ``wandb sync`` if you want.

A logger that fails is switched off for the rest of the run with a warning; the run, its
checkpoints and ``results.json`` never depend on a logger.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import time
from pathlib import Path
from typing import Optional

from .config import LOGGERS, Config, to_dict
from .errors import TlbenchError
from .tracking import Tracker, warn_off

log = logging.getLogger(__name__)

# logger -> (module to import, what to install)
PACKAGES = {"mlflow": ("mlflow", "pip install 'tlbench[mlflow]' (or: pip install mlflow-skinny)"),
            "wandb": ("wandb", "pip install 'tlbench[wandb]' (or: pip install wandb)")}
# settings that change no number and are not hyperparameters
NOT_HPARAMS = ("trainer.resume", "trainer.progress", "trainer.feature_store", "sweep.skip_finished",
               "logger", "logger_dir")
# overrides left out of a run's name (they name no hyperparameter)
NOT_IN_NAME = ("trainer.resume", "trainer.progress", "hydra.", "logger")


def check_available(names) -> None:
    """Before a run starts: every optional logger asked for is installed (else exit 2 saying how)."""
    for name in names:
        if name not in LOGGERS:
            raise TlbenchError(f"{name!r} is not a logger; choose from {', '.join(map(repr, LOGGERS))}")
        if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None:
            raise TlbenchError(f"logger={name} needs the {PACKAGES[name][0]} package, which is not installed: "
                               f"{PACKAGES[name][1]}; or leave it out: logger=[tensorboard,csv]")


def hparams(cfg: Config) -> dict:
    """The full hyperparameter set, flattened (``optim.lr``, ``trainer.batch_size``, ``freeze.name``,
    ...), plus ``batch_size`` (the one in force); values are numbers, booleans or strings (lists
    and ``None`` as text), as TensorBoard's HPARAMS, MLflow params and W&B config take them."""
    flat: dict = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif prefix not in NOT_HPARAMS:
            flat[prefix] = value if isinstance(value, (bool, int, float, str)) else (
                "null" if value is None else "[" + ",".join(map(str, value)) + "]")

    walk("", to_dict(cfg))
    flat["batch_size"] = cfg.batch_size
    return flat


def _short(value: str) -> str:
    """A float written with many digits (an Optuna trial's 0.021240374487011344) -> 4 significant."""
    try:
        f = float(value)
    except ValueError:
        return value
    return f"{f:.4g}" if "." in value and len(value) > 8 else value


def run_name(overrides) -> str:
    """A run's name from the overrides typed for it (``optim.lr=0.001,freeze=last_block``), as in
    Hydra's ``override_dirname``: ``defaults`` when there are none. Safe as one folder name."""
    parts = []
    for o in overrides or []:
        o = str(o).lstrip("+~")
        key, _, value = o.partition("=")
        if not key or key.startswith(NOT_IN_NAME):
            continue
        parts.append(f"{key}={_short(value)}")
    name = ",".join(parts) or "defaults"
    name = name.replace(os.sep, "_").replace("\0", "")
    if len(name.encode()) > 200:  # a folder name has at most 255 bytes
        name = name.encode()[:180].decode(errors="ignore") + "~" + hashlib.sha1(name.encode()).hexdigest()[:8]
    return name


def overrides_of(run_dir: Path) -> list[str]:
    """The overrides recorded in ``run_dir/.hydra/overrides.yaml`` ([] without Hydra files)."""
    import yaml

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    try:
        return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]
    except (OSError, ValueError, yaml.YAMLError):
        return []


def link_in_sweep(run_dir: Path, name: str) -> Optional[Path]:
    """``SWEEP_DIR/tb/<name>`` -> ``../<job>/tb``: the sweep's runs in TensorBoard named by their
    overrides. Another job's link of the same name keeps its name; this one gets ``<name>#<job>``."""
    run_dir = Path(run_dir).absolute()
    folder = run_dir.parent / "tb"
    target = os.path.relpath(run_dir / "tb", folder)
    folder.mkdir(exist_ok=True)
    link = folder / name
    if link.is_symlink() and os.readlink(link) != target:
        link = folder / f"{name}#{run_dir.name}"
    if link.is_symlink() and os.readlink(link) == target:
        return link
    tmp = folder / f".{link.name}.{os.getpid()}.tmp"
    if tmp.is_symlink():
        tmp.unlink()
    os.symlink(target, tmp, target_is_directory=True)
    os.replace(tmp, link)
    return link


# ----------------------------------------------------------------------------- optional backends
class MlflowLogger:
    """A run in a local MLflow file store (never a server)."""

    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, store: Path):
        for var in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
            os.environ[var] = "true"  # offline only: nothing phones home
        os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 asks for this opt-in to a file store
        from mlflow.tracking import MlflowClient

        self.run_dir, self.store = Path(run_dir), Path(store)
        self.client = MlflowClient(tracking_uri=self.store.absolute().as_uri())
        exp = self.client.get_experiment_by_name("tlbench")
        exp_id = exp.experiment_id if exp else self._create_experiment()
        key = str(self.run_dir.absolute())
        found = [r for r in self.client.search_runs([exp_id], max_results=1000)
                 if r.data.tags.get("tlbench.run_dir") == key]  # a resumed run continues its MLflow run
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                                 tags={"tlbench.run_dir": key}).info.run_id

    def _create_experiment(self) -> str:
        try:
            return self.client.create_experiment("tlbench")
        except Exception:  # another job of a sweep created it in between
            return self.client.get_experiment_by_name("tlbench").experiment_id

    def scalars(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in values.items()])

    def hparams(self, hp: dict, metrics: dict, step: int) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in hp.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.scalars(metrics, step)
        figures = self.run_dir / "figures"
        if figures.is_dir():
            self.client.log_artifacts(self.run_id, str(figures), "figures")

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, {"finished": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED"))


class WandbLogger:
    """A W&B run in offline mode (files under ``<dir>/wandb/``; ``wandb sync`` uploads them later)."""

    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, folder: Path, config: dict):
        for var, value in (("WANDB_MODE", "offline"), ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off"),
                           ("WANDB_DISABLE_GIT", "true"), ("WANDB_DISABLE_CODE", "true")):
            os.environ[var] = value  # offline only, quiet, and no copy of the console or the code
        import wandb

        folder.mkdir(parents=True, exist_ok=True)
        run_id = hashlib.sha1(str(Path(run_dir).absolute()).encode()).hexdigest()[:16]  # a resume continues it
        self.run = wandb.init(project="tlbench", name=run_name, id=run_id, resume="allow", dir=str(folder),
                              config=config, mode="offline", reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def scalars(self, values: dict, step: int) -> None:
        x = "global_step" if all(k.endswith("_step") for k in values) else "epoch"  # per-step loss | per epoch
        self.run.log({**values, x: step})

    def hparams(self, hp: dict, metrics: dict, step: int) -> None:
        self.run.config.update(hp, allow_val_change=True)
        for k, v in metrics.items():
            self.run.summary[k] = v

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


def open_backends(cfg: Config, run_dir: Path, name: str) -> list:
    """The optional loggers of ``cfg.logger``, opened; one that fails to open is left out with a warning."""
    where = Path(cfg.logger_dir).expanduser() if cfg.logger_dir else Path(run_dir)
    out = []
    for logger in cfg.logger:
        try:
            if logger == "mlflow":
                out.append(MlflowLogger(run_dir, name, where / "mlruns"))
            elif logger == "wandb":
                out.append(WandbLogger(run_dir, name, where, hparams(cfg)))
        except Exception as e:
            warn_off(logger, e)
    return out


def open_tracker(cfg: Config, run_dir: Path, sweeping: bool = False):
    """The run's :class:`~tlbench.tracking.Tracker` for ``cfg.logger``, named by the run's
    overrides (``.hydra/overrides.yaml``); a sweep's job also gets its named link in ``SWEEP_DIR/tb``."""
    name = run_name(overrides_of(run_dir))
    tensorboard = "tensorboard" in cfg.logger
    tracker = Tracker(run_dir, enabled=tensorboard, backends=open_backends(cfg, run_dir, name))
    log.debug("loggers %s for run %r: %s", list(cfg.logger), name,
              ", ".join(f"{b.name} in {getattr(b, 'store', None) or Path(cfg.logger_dir or run_dir) / 'wandb'}"
                        for b in tracker.backends) or "no optional logger")
    if tensorboard and sweeping:
        try:
            link_in_sweep(run_dir, name)
        except OSError as e:  # e.g. a file system without symbolic links: the run's own tb/ is there
            log.warning("could not link %s into the sweep's tb/ folder (%s)", run_dir / "tb", e)
    return tracker
