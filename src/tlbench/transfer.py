"""``model.init_from=RUN_DIR``: start a model from another tlbench run's best checkpoint.

``model.init_part`` says which tensors:

- ``backbone`` (default): the source's feature extractor -- a classifier's backbone, or a
  ``model=cae`` run's encoder (the cae's backbone *is* its encoder, built like a ``model=cnn``
  backbone from the same keys, so ``tlbench model=cnn model.init_from=CAE_RUN`` needs no other
  flag). The heads are new (random init): the source's classes may differ (cross-dataset transfer).
- ``encoder``: the same tensors, but the source must be a reconstruction run (``model=cae``): a
  guard for recipes that mean "the autoencoder's encoder".
- ``all``: the backbone and the heads (a cae's: the decoder); the source's tasks and classes must
  be this run's.

Exact tensors: every tensor of the receiving part (parameters and BatchNorm buffers) is copied
bit for bit; a key the source lacks, one it has in excess, or a shape that differs is a
:class:`TlbenchError` listing both shapes. The input must line up too: the source run's input
(channels x height x width, from its ``results.json``) must be this run's, or be made so
explicitly (``model.in_chans``, ``model.image_size``).

The loaded blocks then train (or not) under ``freeze.*`` like any pretrained backbone. The model
keeps what it loaded (``model.transfer``), which ``results.json`` records as ``init_from`` (the
source's config hash, dataset fingerprint, epoch) and ``tlbench plan`` prints.

The scratch models (cnn, mlp, cae) are loaded here; torchvision/timm backbones are loaded by
``models.backbones.build_backbone`` as before (with the same checkpoint), and their heads here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from .config import RECONSTRUCTION_MODELS, Config
from .errors import TlbenchError
from .models import SCRATCH
from .models.weights import init_from_checkpoint

log = logging.getLogger(__name__)

SHOWN = 3  # mismatching tensors named in an error


def create_hint(cfg: Config, run_dir: str) -> str:
    """How to make the source run a recipe expects (said when it has no checkpoint)."""
    step = (f"; this is the second step of preset {cfg.experiment}: its first step, `tlbench "
            f"experiment={cfg.experiment}`, writes it") if cfg.experiment else ""
    return (f"train the source run first, e.g. `tlbench model=cae hydra.run.dir={run_dir}` (an autoencoder "
            f"whose encoder fits the default cnn) or any classifier with hydra.run.dir={run_dir}{step}")


def _source_record(run_dir: Path, ckpt: dict) -> dict:
    """What the source run says about itself: results.json when it finished, else splits.json."""
    out = {"finished": (run_dir / "results.json").is_file()}
    for name in ("results.json", "splits.json"):
        try:
            data = json.loads((run_dir / name).read_text())
        except (OSError, ValueError):
            continue
        out.setdefault("dataset_fingerprint", data.get("dataset_fingerprint") or data.get("fingerprint"))
        out.setdefault("input_shape", data.get("input_shape"))
    if not out["finished"]:
        log.warning("model.init_from=%s: that run has not finished (no results.json); its best checkpoint "
                    "so far (epoch %s) is used", run_dir, ckpt.get("epoch"))
    return out


def _prefixes(model, part: str) -> tuple[str, ...]:
    heads = ("heads.", "heads_dist.") if part == "all" else ()
    return ("backbone.", *heads)


def _shape(t) -> str:
    return "x".join(map(str, tuple(t.shape))) or "scalar"


def check(model, ckpt: dict, part: str, run_dir: str) -> list[str]:
    """The keys of ``model`` that ``part`` loads from ``ckpt``; TlbenchError (both shapes, what to
    change) when the source does not fit."""
    src_cfg = ckpt.get("config") or {}
    src_model = (src_cfg.get("model") or {}).get("name", "?")
    if part == "encoder" and src_model not in RECONSTRUCTION_MODELS:
        raise TlbenchError(f"model.init_part=encoder loads an autoencoder's encoder, but {run_dir} is a "
                           f"model={src_model} run; use model.init_part=backbone for its backbone")
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(_prefixes(model, part))}
    theirs = {k: v for k, v in ckpt["model"].items() if k.startswith(_prefixes(model, part))}
    missing = sorted(set(ours) - set(theirs))
    extra = sorted(set(theirs) - set(ours))
    shapes = [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
    if missing or extra or shapes:
        raise TlbenchError(_mismatch(run_dir, src_model, part, ours, theirs, missing, extra, shapes, ckpt))
    return list(ours)


def _mismatch(run_dir, src_model, part, ours, theirs, missing, extra, shapes, ckpt) -> str:
    parts = []
    if shapes:
        parts.append("shapes differ: " + "; ".join(f"{k}: source {_shape(theirs[k])}, this model {_shape(ours[k])}"
                                                     for k in shapes[:SHOWN]))
    if missing:
        parts.append(f"the source lacks {', '.join(missing[:SHOWN])}")
    if extra:
        parts.append(f"the source has more: {', '.join(extra[:SHOWN])}")
    more = len(shapes) + len(missing) + len(extra) - min(len(shapes), SHOWN) - min(len(missing), SHOWN) \
        - min(len(extra), SHOWN)
    fix = ("use the source's model.channels/convs_per_stage/batch_norm/in_chans (or model.name/arch/truncate)"
           if part != "all" or not any(k.startswith("heads") for k in [*missing, *extra, *shapes])
           else f"the source's tasks are {ckpt.get('tasks')}: use model.init_part=backbone for new heads")
    return (f"model.init_from={run_dir!r} (model={src_model}, init_part={part}) does not fit this model: "
            f"{'; '.join(parts)}{f' (and {more} more)' if more > 0 else ''}; {fix}")


def _check_input(source_shape, input_shape, run_dir: str) -> None:
    if source_shape is None or input_shape is None or list(source_shape) == list(input_shape):
        return
    (sc, sh, sw), (c, h, w) = source_shape, input_shape
    fixes = ([f"model.in_chans={sc}"] if sc != c else []) + ([f"model.image_size={sh}"] if (sh, sw) != (h, w) else [])
    raise TlbenchError(f"model.init_from={run_dir!r}: the source run was fed {sc}x{sh}x{sw} images (channels x "
                       f"height x width), this run feeds {c}x{h}x{w}; adapt this run's input explicitly with "
                       f"{' and '.join(fixes)} (images are converted and resized to it)")


def _blocks(model, keys: list[str]) -> list[str]:
    """The backbone blocks whose tensors were loaded (for the plan and results.json)."""
    names = [n for n in model.backbone.blocks()]
    return [n for n in names if any(k.startswith(f"backbone.{n}.") for k in keys)]


def apply(model, cfg: Config, input_shape: Optional[tuple] = None, load: bool = True) -> Optional[dict]:
    """Load ``cfg.model.init_from`` into ``model`` (per ``model.init_part``) and record it as
    ``model.transfer``; nothing without ``init_from``. ``input_shape``: (C, H, W) this run feeds,
    checked against the source's. ``load=False`` (``tlbench plan``, a meta-device model): check
    and record only."""
    m = cfg.model
    if not m.init_from:
        return None
    run_dir = Path(m.init_from).expanduser()
    ckpt = init_from_checkpoint(run_dir, create_hint(cfg, m.init_from))
    source = _source_record(run_dir, ckpt)
    _check_input(source.get("input_shape"), input_shape, m.init_from)
    keys = check(model, ckpt, m.init_part, m.init_from)
    here = m.name in SCRATCH  # torchvision/timm backbones were loaded by build_backbone
    if load:
        _copy(model, ckpt["model"], [k for k in keys if here or not k.startswith("backbone.")])
    src_cfg = ckpt.get("config") or {}
    info = {
        "run_dir": str(run_dir.resolve()), "checkpoint": str(run_dir / "checkpoints" / "best.pt"),
        "part": m.init_part, "epoch": ckpt.get("epoch"), "model": (src_cfg.get("model") or {}).get("name"),
        "dataset": (src_cfg.get("dataset") or {}).get("name"), "tasks": ckpt.get("tasks"),
        "config_hash": ckpt.get("config_hash"), **source,
        "blocks": _blocks(model, keys), "heads": "loaded" if m.init_part == "all" else "new (random init)",
        "tensors": len(keys),
    }
    model.transfer = info
    model.backbone.weights_source = (f"run {m.init_from} (checkpoints/best.pt, epoch {info['epoch']}, "
                                     f"model={info['model']} on {info['dataset']}): {m.init_part}")
    return info


def _copy(model, source: dict, keys: list[str]) -> None:
    sd = model.state_dict()  # tensors sharing the model's storage
    with torch.no_grad():
        for k in keys:
            sd[k].copy_(source[k])


def results_fields(model, bundle) -> dict:
    """``results.json``'s ``input_shape`` (what a later run transferring from this one must feed)
    and ``init_from`` (what this run loaded, or None)."""
    split = bundle.val if len(bundle.val) else bundle.train
    return {"input_shape": list(split[0][0].shape), "init_from": getattr(model, "transfer", None)}


def plan_lines(info: Optional[dict]) -> list[str]:
    """``tlbench plan``: where the transferred blocks come from."""
    if not info:
        return []
    fp = info.get("dataset_fingerprint") or "unknown"
    return [f"transferred:   {', '.join(info['blocks']) or '(no block)'} ({info['tensors']} tensors, init_part="
            f"{info['part']}) from {info['run_dir']}",
            f"               that run: model={info['model']} on {info['dataset']}, best epoch {info['epoch']}, "
            f"config {info['config_hash']}, data {fp}{'' if info['finished'] else ', NOT finished'}; "
            f"heads: {info['heads']}"]
