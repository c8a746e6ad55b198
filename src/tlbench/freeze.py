"""Freeze policies: which parameters of a :class:`~tlbench.models.base.TLModel` train.

:func:`apply_freeze` turns ``(model, FreezeConfig, OptimConfig)`` into a :class:`FreezePlan`
(plain data: trainable/frozen names, BatchNorm layers kept in eval, optimizer parameter
groups) and sets ``requires_grad`` to match. Policies (``freeze.name``):

- ``full``: everything trains.
- ``linear_probe``: only the head(s).
- ``last_block``: the backbone's last block (``backbone.blocks()``) and the head(s).
- ``pattern``: parameters matching ``freeze.train`` globs (fnmatch) on names relative to the
  backbone -- a block name (``blocks.11``: the whole block), a module name (``layer4``,
  ``features.28``) or a parameter name (``norm.*``); ``net.`` may be left out.
- ``index``: the blocks at ``freeze.trainable_layers`` (negative counts from the end).
- ``first_n``: the first ``freeze.n`` blocks are frozen, the rest trains.

Parameters outside every block (a ViT's patch embedding, class/position tokens) train only
under ``full`` or when a ``pattern`` names them; for ``last_block``/``index``/``first_n`` they
stay frozen. A ViT's final norm is part of its last block (see :mod:`tlbench.models.stages`).
The head(s) (``heads`` and ``heads_dist``) train unless ``freeze.head=false``. With
``freeze.gradual=K`` one more block, from the end, trains every K epochs (:func:`gradual_unfreeze`).

BatchNorm layers whose parameters are all frozen are listed in ``bn_eval`` (unless
``freeze.bn=train``): :func:`set_bn_eval` after ``model.train()`` keeps their running
statistics fixed.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

from torch import nn

from .config import FreezeConfig, OptimConfig
from .errors import TlbenchError, choices

log = logging.getLogger(__name__)

POLICIES = ("full", "linear_probe", "last_block", "pattern", "index", "first_n")


@dataclass
class FreezePlan:
    policy: str
    trainable: list[str]  # parameter names (relative to the TLModel)
    frozen: list[str]
    bn_eval: list[str]  # module names of BatchNorm layers kept in eval mode
    groups: list[dict]  # {"name", "params", "lr", "weight_decay"}: ready for torch.optim
    blocks: list[dict]  # {"name", "n_params", "n_trainable", "trainable"}
    total: int
    trainable_count: int
    outside: dict = field(default_factory=dict)  # backbone params in no block: n_params, n_trainable


def _block_list(model) -> list[tuple[str, list[nn.Parameter]]]:
    """[(block name, params)], each parameter in the first block that holds it."""
    seen: set[int] = set()
    out = []
    for name, mod in model.backbone.blocks().items():
        ps = [p for p in mod.parameters() if id(p) not in seen]
        seen.update(id(p) for p in ps)
        out.append((name, ps))
    return out


def _listing(blocks) -> str:
    return ", ".join(f"{i}:{n}" for i, (n, _) in enumerate(blocks)) or "(this backbone has no blocks)"


def _head_params(model) -> list[nn.Parameter]:
    heads = [model.heads] + ([model.heads_dist] if getattr(model, "heads_dist", None) is not None else [])
    return [p for h in heads for p in h.parameters()]


def _rel_names(model) -> dict[int, list[str]]:
    """id(param) -> its names relative to the backbone (and to ``backbone.net`` when there is one)."""
    has_net = isinstance(getattr(model.backbone, "net", None), nn.Module)
    out: dict[int, list[str]] = {}
    for name, p in model.backbone.named_parameters():
        names = [name] + ([name[4:]] if has_net and name.startswith("net.") else [])
        out[id(p)] = names
    return out


def _match_pattern(model, blocks, globs) -> set[int]:
    if not globs:
        raise TlbenchError(
            "freeze.name=pattern needs freeze.train=[GLOB,...], e.g. freeze.train=[layer4*]; "
            f"available blocks: {_listing(blocks)}"
        )
    rel = _rel_names(model)
    chosen: set[int] = set()
    for g in globs:
        hit = {id(p) for n, ps in blocks if fnmatch.fnmatchcase(n, g) for p in ps}
        for pid, names in rel.items():
            parts = [".".join(n.split(".")[:k]) for n in names for k in range(1, n.count(".") + 2)]
            if any(fnmatch.fnmatchcase(s, g) for s in parts):
                hit.add(pid)
        if not hit:
            raise TlbenchError(
                f"freeze.train pattern {g!r} matches no parameter or module of the backbone; "
                f"available blocks: {_listing(blocks)} (globs match names like <block>.* or <module>.weight)"
            )
        chosen |= hit
    return chosen


def _select(model, cfg: FreezeConfig, blocks) -> set[int]:
    """ids of the backbone parameters the policy trains (before gradual unfreezing and heads)."""
    if cfg.name not in POLICIES:
        raise TlbenchError(f"freeze.name={cfg.name!r} is not a freeze policy; choose one of {choices(POLICIES)}")
    if cfg.name == "full":
        return {id(p) for p in model.backbone.parameters()}
    if cfg.name == "linear_probe":
        return set()
    if cfg.name == "pattern":
        return _match_pattern(model, blocks, cfg.train)
    if not blocks:
        raise TlbenchError(
            f"freeze.name={cfg.name} needs backbone blocks, but this backbone lists none; use full or pattern"
        )
    n = len(blocks)
    if cfg.name == "last_block":
        idx = [n - 1]
    elif cfg.name == "first_n":
        if not 0 <= cfg.n <= n:
            raise TlbenchError(f"freeze.n={cfg.n} is out of range: the backbone has {n} blocks ({_listing(blocks)})")
        idx = list(range(cfg.n, n))
    else:  # index
        if not cfg.trainable_layers:
            raise TlbenchError(f"freeze.name=index needs freeze.trainable_layers=[i,...]; blocks: {_listing(blocks)}")
        bad = [i for i in cfg.trainable_layers if not -n <= i < n]
        if bad:
            raise TlbenchError(
                f"freeze.trainable_layers={list(cfg.trainable_layers)}: index {bad[0]} is out of range "
                f"(-{n}..{n - 1}); available blocks: {_listing(blocks)}"
            )
        idx = sorted({i % n for i in cfg.trainable_layers})
    return {id(p) for i in idx for p in blocks[i][1]}


def apply_freeze(model, cfg: FreezeConfig, optim: OptimConfig, epoch: int = 0) -> FreezePlan:
    """Set ``requires_grad`` on ``model`` per ``cfg`` (at ``epoch`` for gradual unfreezing)."""
    blocks = _block_list(model)
    train = _select(model, cfg, blocks)
    if cfg.gradual > 0 and blocks:
        extra = min(epoch // cfg.gradual, len(blocks))
        train |= {id(p) for _, ps in blocks[len(blocks) - extra :] for p in ps}
    if cfg.head:
        train |= {id(p) for p in _head_params(model)}
    named = list(model.named_parameters())
    for _, p in named:
        p.requires_grad_(id(p) in train)
    if not train:
        raise TlbenchError(f"freeze.name={cfg.name} with freeze.head=false leaves nothing to train")
    in_block = {id(p) for _, ps in blocks for p in ps}
    outside = [p for p in model.backbone.parameters() if id(p) not in in_block]
    plan = FreezePlan(
        policy=cfg.name,
        trainable=[n for n, p in named if id(p) in train],
        frozen=[n for n, p in named if id(p) not in train],
        bn_eval=[] if cfg.bn == "train" else _frozen_bn(model, train),
        groups=_groups(model, blocks, outside, train, optim, _block_lrs(cfg.groups, blocks)),
        blocks=[_block_info(n, ps, train) for n, ps in blocks],
        total=sum(p.numel() for _, p in named),
        trainable_count=sum(p.numel() for _, p in named if id(p) in train),
        outside={
            "n_params": sum(p.numel() for p in outside),
            "n_trainable": sum(p.numel() for p in outside if id(p) in train),
        },
    )
    log.debug("freeze %s (epoch %d): %d of %d parameters train", cfg.name, epoch, plan.trainable_count, plan.total)
    return plan


def _block_info(name: str, ps: list[nn.Parameter], train: set[int]) -> dict:
    n_train = sum(p.numel() for p in ps if id(p) in train)
    return {"name": name, "n_params": sum(p.numel() for p in ps), "n_trainable": n_train, "trainable": n_train > 0}


def _frozen_bn(model, train: set[int]) -> list[str]:
    """BatchNorm layers of the backbone with no trainable parameter (parameter-free ones: when
    their parent module has none either)."""
    out = []
    mods = dict(model.named_modules())
    for name, m in mods.items():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm) or not name.startswith("backbone."):
            continue
        own = list(m.parameters())
        scope = own or list(mods[name.rpartition(".")[0]].parameters())
        if not any(id(p) in train for p in scope):
            out.append(name)
    return out


def _split_decay(name: str, ps: list[nn.Parameter], lr: float, wd: float) -> list[dict]:
    """One group, or two when weight decay is on: biases and norm weights (1-d) get none."""
    if wd <= 0:
        return [{"name": name, "params": ps, "lr": lr, "weight_decay": 0.0}] if ps else []
    decay = [p for p in ps if p.ndim > 1]
    no_decay = [p for p in ps if p.ndim <= 1]
    groups = [{"name": name, "params": decay, "lr": lr, "weight_decay": wd}]
    groups.append({"name": f"{name}/no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def _block_lrs(entries, blocks) -> dict[str, float]:
    """``freeze.groups=[features.2*:1e-4,...]`` -> {block name: lr} (the first matching glob wins)."""
    out: dict[str, float] = {}
    names = [n for n, _ in blocks]
    for entry in entries:
        glob, sep, value = entry.rpartition(":")
        try:
            lr = float(value)
        except ValueError:
            lr = -1.0
        if not sep or not glob or lr <= 0:
            raise TlbenchError(f"freeze.groups entry {entry!r} must be BLOCK_GLOB:LR with LR > 0, "
                               f"e.g. freeze.groups=[features.2*:1e-4]; blocks: {_listing(blocks)}")
        hits = [n for n in names if fnmatch.fnmatchcase(n, glob) and n not in out]
        if not any(fnmatch.fnmatchcase(n, glob) for n in names):
            raise TlbenchError(f"freeze.groups entry {entry!r} matches no block; blocks: {_listing(blocks)}")
        out.update({n: lr for n in hits})
    return out


def _groups(model, blocks, outside, train: set[int], optim: OptimConfig, block_lrs=None) -> list[dict]:
    """Optimizer groups. ``layer_decay=d``: block i of n gets lr * d**(n-1-i), parameters
    outside every block (stem, tokens) lr * d**n; ``head_lr`` sets the head(s)' lr;
    ``block_lrs`` (from ``freeze.groups``) gives named blocks their own lr."""
    lr, wd = optim.lr, optim.weight_decay
    groups: list[dict] = []
    if block_lrs and optim.layer_decay is not None:
        raise TlbenchError("freeze.groups and optim.layer_decay both set block learning rates; use one of them")
    if block_lrs:
        own = {id(p) for n, ps in blocks if n in block_lrs for p in ps}
        for n, ps in blocks:
            if n in block_lrs:
                groups += _split_decay(n, [p for p in ps if id(p) in train], block_lrs[n], wd)
        rest = [p for p in model.backbone.parameters() if id(p) in train and id(p) not in own]
        groups += _split_decay("backbone", rest, lr, wd)
    elif optim.layer_decay is not None and blocks:
        n, d = len(blocks), optim.layer_decay
        groups += _split_decay("backbone.other", [p for p in outside if id(p) in train], lr * d**n, wd)
        for i, (name, ps) in enumerate(blocks):
            groups += _split_decay(name, [p for p in ps if id(p) in train], lr * d ** (n - 1 - i), wd)
    else:
        groups += _split_decay("backbone", [p for p in model.backbone.parameters() if id(p) in train], lr, wd)
    heads = [p for p in _head_params(model) if id(p) in train]
    groups += _split_decay("heads", heads, optim.head_lr or lr, wd)
    return groups


def set_bn_eval(model: nn.Module, plan: FreezePlan) -> None:
    """Put the plan's frozen BatchNorm layers in eval mode (call after ``model.train()``)."""
    for name in plan.bn_eval:
        model.get_submodule(name).eval()


def gradual_unfreeze(model, cfg: FreezeConfig, optim: OptimConfig, epoch: int) -> FreezePlan | None:
    """The plan for (0-based) ``epoch`` under ``freeze.gradual=K``, or None when it is unchanged.

    The last ``epoch // K`` blocks train on top of the policy's own choice. The plan is
    recomputed from ``epoch`` alone (not from the previous call), so a resumed run gets the
    right set. Rebuild the optimizer from the new plan's groups.
    """
    if cfg.gradual <= 0:
        return None
    before = {n for n, p in model.named_parameters() if p.requires_grad}
    plan = apply_freeze(model, cfg, optim, epoch=epoch)
    if set(plan.trainable) == before:
        return None
    log.info("epoch %d: gradual unfreezing, %d parameters now train", epoch, plan.trainable_count)
    return plan
