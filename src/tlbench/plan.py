"""``tlbench plan``: what a run would train, printed without training.

A plan needs neither weights nor images (:func:`build_plan`): the backbone is built as an
architecture only (``structure_only``: meta device, no weights read or downloaded; the report
says whether they are cached and where), the tasks come from the dataset's metadata or folder
names (``data.meta``), and nothing is decoded. So it answers in seconds, offline, also without
the dataset on disk when its class list is known (sklearn_digits, cifar10, emnist).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Optional

from .freeze import FreezePlan
from .transfer import plan_lines


def build_plan(cfg):
    """``(model, freeze plan, {task: class names}, dataset meta)`` for ``cfg``, reading no weights
    and no images. Parameter counts, blocks and groups are those of ``build.build_everything``."""
    import torch
    from torch.nn.parameter import is_lazy

    from .build import seed_everything
    from .config import is_reconstruction
    from .validation import check_tasks
    from .models.cae import CAE, RECON_TASK
    from .transfer import apply as apply_transfer
    from .data.meta import plan_tasks
    from .freeze import apply_freeze
    from .models import TLModel, build_backbone, build_model
    from .models.backbones import BACKBONE_NAMES
    from .models.backbones import build_backbone as build_net

    seed_everything(cfg.seed)
    meta_device = cfg.model.name in BACKBONE_NAMES
    if meta_device:
        backbone = build_net(cfg.model, structure_only=True)
    else:  # from-scratch models are small: built as in a run (an unknown name: its error)
        backbone = build_backbone(cfg.model)
    tasks, meta = plan_tasks(cfg.dataset)
    if is_reconstruction(cfg):
        tasks = {RECON_TASK: []}
    check_tasks(cfg, tasks, meta.tasks)
    sizes = {t: len(n) for t, n in tasks.items()}
    model = CAE(cfg.model, backbone) if is_reconstruction(cfg) else TLModel(backbone, sizes, cfg.head)
    if any(is_lazy(p) for p in model.parameters()):  # the mlp's first layer: sized by one forward
        spec = backbone.input_spec
        side = spec.size if spec.resize and spec.size else meta.native_size()
        model = build_model(backbone, sizes, cfg.head, torch.zeros(2, spec.channels, side, side))
    apply_transfer(model, cfg, load=not meta_device)  # model.init_from: checked against the source, recorded
    plan = apply_freeze(model, cfg.freeze, cfg.optim)
    return model, plan, tasks, meta


def plan_data(model, plan: FreezePlan, tasks: Optional[dict] = None, classes_from: Optional[str] = None) -> dict:
    """The plan as JSON-able data (what :func:`plan_report` prints)."""
    bb = model.backbone
    spec = bb.input_spec
    info = getattr(bb, "weights_info", None)
    return {
        "policy": plan.policy,
        "weights_source": getattr(bb, "weights_source", "random init"),
        **({"weights": asdict(info)} if info is not None else {}),
        **({"tasks": tasks, "classes_from": classes_from} if tasks is not None else {}),
        "input": {
            "size": spec.size,
            "channels": spec.channels,
            "mean": list(spec.mean),
            "std": list(spec.std),
            "resize": spec.resize,
        },
        "feature_dim": bb.feature_dim,
        "blocks": plan.blocks,
        "outside_blocks": plan.outside,
        "heads": {t: sum(p.numel() for p in h.parameters()) for t, h in model.heads.items()},
        "params": {"total": plan.total, "trainable": plan.trainable_count},
        "groups": [
            {
                "name": g["name"],
                "lr": g["lr"],
                "weight_decay": g["weight_decay"],
                "n_params": sum(p.numel() for p in g["params"]),
            }
            for g in plan.groups
        ],
        "bn_eval": plan.bn_eval,
        "init_from": getattr(model, "transfer", None),
    }


def _fmt(n: int) -> str:
    return f"{n:,}"


def _weights_line(w: dict) -> list[str]:
    """Whether the weights a run would load are on disk, and where (nothing when it loads none)."""
    if w.get("cached") is None:
        return []
    if w["cached"]:
        return [f"weights file:  cached, {w['path']}"]
    looked = f"looked for {w['path']}; " if w.get("path") else ""
    return [f"weights file:  MISSING ({looked}{w.get('fix') or 'not on disk'})"]


def _names(names: list[str], shown: int = 8) -> str:
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def plan_report(model, plan: FreezePlan, as_json: bool = False, tasks: Optional[dict] = None,
                classes_from: Optional[str] = None) -> str:
    """Human-readable (or JSON) report of blocks, parameter counts, optimizer groups, BN layers
    kept in eval, input size/normalization, the weights source (and whether it is cached) and,
    when given, the tasks with their classes."""
    d = plan_data(model, plan, tasks, classes_from)
    if as_json:
        return json.dumps(d, indent=2)
    inp = d["input"]
    mean = ", ".join(f"{m:.3f}" for m in inp["mean"])
    std = ", ".join(f"{s:.3f}" for s in inp["std"])
    size = f"{inp['size']}x{inp['size']}, " if inp["resize"] else "the dataset's native size, "
    lines = [
        f"freeze policy: {d['policy']}",
        f"weights:       {d['weights_source']}",
        *_weights_line(d.get("weights", {})),
        f"input:         {size}{inp['channels']} channels, mean ({mean}), std ({std})",
        f"features:      {d['feature_dim']}",
        *plan_lines(d["init_from"]),
    ]
    for task, names in (tasks or {}).items():
        lines.append(f"task {task + ':':<9}{len(names)} classes ({_names(names)})" if names else
                     f"task {task}: the input image, reconstructed (labels not used)")
    if classes_from:
        lines.append(f"classes from:  {classes_from}")
    lines += [
        "",
        f"{'#':>3}  {'block':<40} {'params':>12} {'trainable':>12}",
    ]
    for i, b in enumerate(d["blocks"]):
        flag = "yes" if b["n_trainable"] == b["n_params"] else ("partly" if b["trainable"] else "no")
        lines.append(f"{i:>3}  {b['name']:<40} {_fmt(b['n_params']):>12} {flag:>12}")
    out = d["outside_blocks"]
    if out.get("n_params"):
        lines.append(f"{'':>3}  {'(outside blocks)':<40} {_fmt(out['n_params']):>12} {_fmt(out['n_trainable']):>12}")
    for task, n in d["heads"].items():
        lines.append(f"{'':>3}  {'head ' + task:<40} {_fmt(n):>12}")
    total, trainable = d["params"]["total"], d["params"]["trainable"]
    share = 100 * trainable / max(total, 1)
    lines += ["", f"parameters: {_fmt(total)} total, {_fmt(trainable)} trainable ({share:.2f} %)", ""]
    lines.append("optimizer groups:")
    for g in d["groups"]:
        lines.append(
            f"  {g['name']:<40} lr {g['lr']:.3g}  weight_decay {g['weight_decay']:g}  ({_fmt(g['n_params'])} params)"
        )
    bn = d["bn_eval"]
    lines.append("")
    shown = f" ({', '.join(bn[:4])}{', ...' if len(bn) > 4 else ''})" if bn else ""
    lines.append(f"BatchNorm kept in eval: {len(bn)}{shown}")
    return "\n".join(lines)


def cache_data(cfg, model, plan: FreezePlan) -> dict:
    """Whether the frozen-prefix cache applies to this run and why (not); where it applies, the
    forward FLOPs per image of the frozen prefix and the trainable suffix, the expected per-epoch
    speed-up (FLOPs only) and the store space per image (``features.decide`` decides as a run does)."""
    import torch

    from .features import decide
    from .models.split import flops, split_backbone

    d = decide(cfg, model, plan)
    out = {"applied": d.applied, "reason": d.reason, "split_block": d.split_block}
    if not d.applied or d.split_block is None:
        return out
    try:
        bb, spec = model.backbone, model.backbone.input_spec
        size = cfg.model.image_size or spec.size
        if not size:
            return out
        f = flops(bb, d.split_block, size)
        prefix, _ = split_backbone(bb, d.split_block)
        dev = next((p.device for p in bb.parameters()), torch.device("cpu"))
        with torch.no_grad():
            h = prefix(torch.zeros(1, spec.channels, size, size, device=dev))
        per_image = h.numel() * (2 if cfg.trainer.feature_dtype == "float16" else 4)
        copies = 2 if cfg.dataset.augment == "flip" else 1
        out.update({"flops_per_image": {"prefix": f.prefix, "suffix": f.suffix},
                    "expected_speedup_per_epoch": f.expected_speedup(1, 0),
                    "store_bytes_per_image": per_image * copies})
    except Exception as e:  # noqa: BLE001 - the plan still prints; say why the numbers are missing
        out["numbers_unavailable"] = f"{type(e).__name__}: {e}"
    return out


def _cache_lines(c: dict) -> list[str]:
    if not c["applied"]:
        return [f"prefix cache:  not applied: {c['reason']}"]
    where = f"the prefix up to block {c['split_block']}" if c["split_block"] else "the whole backbone"
    lines = [f"prefix cache:  applied: {where} runs once ({c['reason']})"]
    fl = c.get("flops_per_image")
    if fl:
        lines.append(f"               forward GFLOPs per image: frozen prefix {fl['prefix'] / 1e9:.3g}, "
                     f"trainable suffix {fl['suffix'] / 1e9:.3g}; expected training epoch speed-up "
                     f"~{c['expected_speedup_per_epoch']:.1f}x (FLOPs only)")
        lines.append(f"               feature store: {c['store_bytes_per_image'] / 1024:.1f} KiB per image")
    return lines


def plan_text(cfg, as_json: bool) -> str:
    """``tlbench plan``: the model and freeze plan from :func:`build_plan` (no weights, no images),
    and what the frozen-prefix cache would do."""
    model, plan, tasks, meta = build_plan(cfg)
    cache = cache_data(cfg, model, plan)
    if as_json:
        d = json.loads(plan_report(model, plan, True, tasks, meta.origin))
        d["prefix_cache"] = cache
        return json.dumps(d, indent=2)
    return plan_report(model, plan, False, tasks, meta.origin) + "\n" + "\n".join(_cache_lines(cache))


# what build_plan reads; jobs that differ only elsewhere (seed, trainer, sched, ...) share a plan
PLAN_SECTIONS = ("dataset", "model", "head", "freeze", "optim", "eval", "loss")


def check_jobs(jobs, remote: bool = False) -> int:
    """Build the plan of every job of a sweep (``[(overrides, Config), ...]``) before the first one
    starts, as ``tlbench plan`` does (architecture on the meta device, no weights, no images), so a
    model or freeze setting that only one job has (``freeze.trainable_layers=[5]`` on a model with
    fewer blocks) is refused before job #0 trains, naming that job's overrides. Jobs with the same
    :data:`PLAN_SECTIONS` share one plan. ``remote``: the jobs run on other machines (SLURM), so a
    folder dataset missing here is not checked (its files may exist only there). Returns the
    number of plans built."""
    from pathlib import Path

    from .config import FOLDER_DATASETS, to_dict
    from .errors import TlbenchError

    seen: set[str] = set()
    built = 0
    for i, (overrides, cfg) in enumerate(jobs):
        d = to_dict(cfg)
        key = json.dumps({k: d.get(k) for k in PLAN_SECTIONS}, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        if remote and cfg.dataset.name in FOLDER_DATASETS and not (cfg.dataset.root and Path(cfg.dataset.root).is_dir()):
            continue
        try:
            build_plan(cfg)
            built += 1
        except TlbenchError as e:
            raise TlbenchError(
                f"sweep job #{i} of {len(jobs)} ({' '.join(overrides)}) cannot run: {e}. No job was started "
                f"(every job's model and freeze plan is built before the first one); fix or drop that "
                f"value") from None
    return built
