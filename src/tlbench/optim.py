"""Optimizers and schedulers from parameter groups (the FreezePlan's groups).

Every group keeps its own ``lr`` (``initial_lr`` for schedulers) and ``name``, so
per-group learning rates (head vs backbone, layer-wise decay) work with any scheduler.
Schedulers step once per epoch; ``plateau`` steps on the validation loss.
"""

from __future__ import annotations

import math

import torch

from .config import OptimConfig, SchedConfig
from .errors import TlbenchError


IMPL_KWARGS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}, "default": {}}


def fused_devices() -> list[str]:
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return list(_get_fused_kernels_supported_devices())


def optimizer_impl(impl: str, device: torch.device) -> str:
    """``optim.impl`` on ``device`` -> ``fused`` | ``foreach`` | ``loop`` | ``default`` (torch's
    choice: foreach on CUDA, a loop on CPU). ``auto`` = fused on CUDA, torch's default elsewhere;
    ``fused`` where torch has no fused kernels for the device is refused."""
    if impl == "auto":
        return "fused" if device.type == "cuda" and "cuda" in fused_devices() else "default"
    if impl == "fused" and device.type not in fused_devices():
        raise TlbenchError(f"optim.impl=fused: this torch has no fused optimizer kernels for {device.type} "
                           f"(it has them for {', '.join(fused_devices())}); use optim.impl=auto, foreach or loop")
    return impl


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = [dict(g) for g in groups if g["params"]]
    if not groups:
        raise TlbenchError(
            "no parameter trains under this freeze policy; choose a policy that leaves something "
            "trainable (e.g. freeze=linear_probe trains the head) or set freeze.head=true"
        )
    for g in groups:
        g.setdefault("lr", cfg.lr)
        g.setdefault("weight_decay", cfg.weight_decay)
    impl = IMPL_KWARGS[optimizer_impl(cfg.impl, groups[0]["params"][0].device)]  # the params' device
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, **impl)
    if cfg.nesterov:
        raise TlbenchError(f"optim.nesterov=true only applies to optim=sgd, not {cfg.name!r}")
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, **impl)


def fill_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give SGD parameters without a momentum buffer a zero one, in groups where others have one.

    Gradual unfreezing rebuilds the optimizer with the trained parameters'
    state: the newly trainable ones have no buffer yet. Torch's fused SGD only handles a group
    where every buffer is missing or none is (a mix fails: "expected Tensor as element 0 in
    argument 2, but got NoneType"); the loop and foreach versions start a missing buffer at the
    gradient. A zero buffer gives that same first step: with dampening 0 (tlbench's SGD), the
    update ``buf = momentum * buf + grad`` is ``grad``."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("momentum"):
            continue
        assert not group.get("dampening"), "zero buffers match a fresh buffer only without dampening"
        has = [optimizer.state.get(p, {}).get("momentum_buffer") is not None for p in group["params"]]
        if any(has) and not all(has):
            for p, h in zip(group["params"], has):
                if not h:
                    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SchedConfig, max_epochs: int):
    """Return a scheduler (stepped per epoch) or ``None``."""
    if cfg.name == "none":
        return None
    if cfg.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=cfg.factor, patience=cfg.patience)
    # cosine with linear warmup, as a multiplier of each group's own lr
    base = [g["lr"] for g in optimizer.param_groups]
    floor = [cfg.min_lr / b if b > 0 else 0.0 for b in base]
    warm, total = cfg.warmup_epochs, max(1, max_epochs)

    def factor(epoch: int, k: int) -> float:
        if epoch < warm:
            return (epoch + 1) / (warm + 1)
        t = (epoch - warm) / max(1, total - warm)
        return floor[k] + (1 - floor[k]) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    lambdas = [lambda e, k=k: factor(e, k) for k in range(len(base))]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def step_scheduler(scheduler, val_loss: float) -> None:
    if scheduler is None:
        return
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_loss)
    else:
        scheduler.step()


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {g.get("name", f"group{i}"): g["lr"] for i, g in enumerate(optimizer.param_groups)}
