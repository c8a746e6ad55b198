"""Typed, frozen configuration: the dataclasses, their choices, ``to_dict`` and ``config_hash``.

``compose.py`` composes the Hydra config and hands the plain dict to ``validation.to_config``,
which checks it against the schema and the rules; nothing below the CLI ever sees an OmegaConf
object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional

from . import registry

DATASETS = tuple(registry.DATASETS)
AUGMENTS = ("none", "flip", "flip_crop", "randaugment")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("none", "step", "cosine", "plateau")
PRECISIONS = ("32", "16-mixed", "bf16-mixed", "auto")  # auto: bf16-mixed on a CUDA GPU with bf16, else 32
PIPELINES = ("auto", "tensor", "loader")  # data/pipeline.py
SWITCHES = ("auto", "true", "false")
OPTIMIZER_IMPLS = ("auto", "fused", "foreach", "loop")  # speed.optimizer_kwargs
MONITORS = ("val/loss", "val/accuracy", "val/macro_f1")  # the mode (min for loss, else max) follows the name
RECONSTRUCTION_MODELS = tuple(n for n, m in registry.MODELS.items() if m.task == "reconstruction")  # tlbench.recon
LOSSES = {"classification": ("auto", "cross_entropy"), "reconstruction": ("auto", "mse", "bce")}
INIT_PARTS = ("backbone", "encoder", "all")  # what model.init_from loads (tlbench.transfer)
LOGGERS = ("tensorboard", "csv", "mlflow", "wandb")  # tlbench.loggers; mlflow/wandb: optional extras, offline


@dataclass(frozen=True)
class DatasetConfig:
    name: str = "sklearn_digits"
    root: Optional[str] = None  # folder holding the dataset in its official layout
    download: bool = False  # fetch with the official downloader when root lacks the files
    task: Optional[str] = None  # which task(s) to train; None = the dataset's default
    split: Optional[str] = None  # dataset variant, e.g. EMNIST balanced|byclass|...
    classes: Optional[tuple[str, ...]] = None  # subset of class names (folder datasets)
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    official_test: bool = True  # use the format's own test split where it has one
    stratify: bool = True
    split_seed: int = 0  # splits depend on this only, never on the training seed
    limit_per_class: Optional[int] = None
    train_fraction: float = 1.0  # keep this stratified part of the training split (val/test untouched)
    train_per_class: Optional[int] = None  # or at most N training items per class (not with train_fraction)
    batch_size: Optional[int] = None  # overrides trainer.batch_size when set
    num_workers: Optional[int] = None  # None = auto (0 on CPU, a few on CUDA)
    pin_memory: Optional[bool] = None
    augment: str = "none"
    class_weights: str = "none"  # none|balanced
    on_bad_image: str = "error"  # error|skip
    pipeline: str = "auto"  # tensor: uint8 images on the device, batches sliced; loader: a DataLoader; auto: tensor if it fits
    tensor_budget_gb: float = 4.0  # auto picks the tensor path when the decoded uint8 images take at most this


@dataclass(frozen=True)
class HeadConfig:
    hidden: tuple[int, ...] = ()
    dropout: float = 0.0
    activation: str = "relu"


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn"
    arch: Optional[str] = None  # torchvision/timm architecture name
    pretrained: bool = False
    weights: Optional[str] = None  # local .pth/.safetensors file
    init_from: Optional[str] = None  # a previous tlbench run dir
    init_part: str = "backbone"  # what init_from loads: backbone | encoder (a cae run's) | all (+ heads)
    truncate: Optional[str] = None  # keep the backbone up to this block
    image_size: Optional[int] = None  # input size; None = the model's own
    in_chans: int = 3  # channels the model is fed; grayscale is expanded, never a random conv
    channels: tuple[int, ...] = (32, 64)  # scratch cnn: conv widths per stage
    convs_per_stage: int = 1
    batch_norm: bool = True
    hidden: tuple[int, ...] = (256, 128)  # scratch mlp hidden sizes
    dropout: float = 0.0  # scratch models
    latent: Optional[int] = None  # cae: channels of the code (a 1x1 conv after the encoder); None = none


@dataclass(frozen=True)
class FreezeConfig:
    name: str = "full"
    train: tuple[str, ...] = ()  # pattern policy: globs of trainable names
    trainable_layers: tuple[int, ...] = ()  # index policy
    n: int = 0  # first_n policy
    head: bool = True  # the new head(s) train
    bn: str = "eval"  # eval|train: frozen BatchNorm mode
    gradual: int = 0  # unfreeze one more block every K epochs (0 = off)
    groups: tuple[str, ...] = ()  # own learning rates for blocks: [features.2*:1e-4, ...] (glob:lr)


@dataclass(frozen=True)
class OptimConfig:
    name: str = "adam"
    lr: float = 1e-3
    head_lr: Optional[float] = None
    weight_decay: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: Optional[float] = None
    impl: str = "auto"  # fused | foreach | loop; auto = fused on CUDA, torch's default elsewhere (speed.py)


@dataclass(frozen=True)
class SchedConfig:
    name: str = "none"
    step_size: int = 10  # step
    gamma: float = 0.1  # step
    warmup_epochs: int = 0  # cosine
    min_lr: float = 0.0  # cosine
    factor: float = 0.5  # plateau
    patience: int = 2  # plateau


@dataclass(frozen=True)
class TrainerConfig:
    max_epochs: int = 10
    batch_size: int = 64
    device: str = "auto"
    devices: int = 1  # processes of one DDP run (tlbench starts torchrun); batch_size is the global batch
    sync_bn: str = "auto"  # DDP: BatchNorm over the global batch (SyncBatchNorm, CUDA only); auto = on CUDA
    precision: str = "32"
    grad_clip: Optional[float] = None
    monitor: str = "val/loss"
    patience: Optional[int] = None  # early stopping; None = off
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    progress: bool = True
    resume: Optional[str] = None  # RUN_DIR or "auto"
    cache_features: str = "auto"  # frozen prefix run once: auto (where it applies) | true (error where not) | false
    feature_store: Optional[str] = "auto"  # auto = $TLBENCH_CACHE/features or ~/.cache/tlbench/features; PATH; null = no disk
    feature_dtype: str = "float16"  # dtype of the stored prefix outputs: float16 | float32
    num_threads: Optional[int] = None  # torch CPU threads; None = torch's default
    deterministic: bool = True
    log_every_n_steps: Optional[int] = 50  # training loss to TensorBoard every N steps (one sync each); None = off
    divergence_factor: Optional[float] = 1000.0  # stop (status diverged) when an epoch's train loss
    # exceeds this x epoch 1's; None = off (NaN/inf always stops)
    compile: str = "auto"  # torch.compile what trains (suffix + heads): auto = on CUDA only | true | false
    channels_last: str = "auto"  # auto = on CUDA for conv nets | true | false
    cudnn_benchmark: str = "auto"  # auto = on CUDA when deterministic=false | true | false
    tf32: str = "auto"  # TF32 matmul/conv: auto = on CUDA when deterministic=false | true | false


@dataclass(frozen=True)
class EvalConfig:
    topk: tuple[int, ...] = (1, 3)  # top-k accuracies reported (k < number of classes)
    bootstrap: int = 0  # resamples for 95% bootstrap CIs of accuracy and macro F1 (0 = off)
    positive_class: Optional[str] = None  # binary tasks: the positive class name (default: the second)
    calibration_bins: int = 15  # bins of the expected calibration error and reliability diagram


@dataclass(frozen=True)
class SweepConfig:
    skip_finished: bool = True  # multirun: skip jobs whose config already finished in this sweep dir;
    # resume jobs that left a last.pt but no results.json


@dataclass(frozen=True)
class Config:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    experiment: Optional[str] = None  # name of the preset, informational
    loss: str = "auto"  # auto = cross_entropy (classifiers) | mse (cae); cae also: bce
    logger: tuple[str, ...] = ("tensorboard", "csv")  # where metrics go besides results.json (LOGGERS)
    logger_dir: Optional[str] = None  # mlflow's file store / wandb's offline files; None = inside the run dir

    @property
    def batch_size(self) -> int:
        return self.dataset.batch_size or self.trainer.batch_size


FOLDER_DATASETS = tuple(n for n, d in registry.DATASETS.items() if d.folders)
SWITCH_KEYS = ("compile", "channels_last", "cudnn_benchmark", "tf32")

def is_reconstruction(cfg: Config) -> bool:
    """Whether the run reconstructs its input (``model=cae``) instead of classifying it."""
    return cfg.model.name in RECONSTRUCTION_MODELS


def to_dict(cfg: Config) -> dict:
    """The config as plain JSON-able data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# the same batches and the same model either way, up to float rounding (docs/architecture.md)
SPEED_KEYS = (("dataset", "pipeline"), ("dataset", "tensor_budget_gb"), ("optim", "impl"),
              *(("trainer", k) for k in SWITCH_KEYS))

# keys added after runs had been recorded: left out of the hash while at their defaults, so a run
# recorded before they existed keeps its hash (resume, a relaunched sweep's skip of finished jobs)
LATER_KEYS = (("model", "init_part"), ("model", "latent"), ("loss",), ("trainer", "sync_bn"), ("dataset", "train_fraction"),
              ("dataset", "train_per_class"))


def config_hash(cfg: Config) -> str:
    """Stable hash of everything that changes a run's result (not resume/progress)."""
    d = to_dict(cfg)
    defaults = to_dict(Config())
    for *parents, key in LATER_KEYS:
        node, default = d, defaults
        for p in parents:
            node, default = node[p], default[p]
        if node.get(key) == default[key]:
            node.pop(key, None)
    d["trainer"].pop("resume", None)
    d["trainer"].pop("progress", None)
    d["trainer"].pop("feature_store", None)  # where stored outputs live changes no number
    d["trainer"].pop("devices", None)  # N processes train on the same global batches (results.json says how many)
    for group, key in SPEED_KEYS:  # how batches are made and run, not what they are (results.json's "speed")
        d[group].pop(key, None)
    d.pop("logger", None)  # nor where the metrics are reported
    d.pop("logger_dir", None)
    d.pop("sweep", None)
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
