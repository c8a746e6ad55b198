"""``tlbench plan``: what a run would train, printed without training."""

from __future__ import annotations

import json

from .freeze import FreezePlan


def plan_data(model, plan: FreezePlan) -> dict:
    """The plan as JSON-able data (what :func:`plan_report` prints)."""
    bb = model.backbone
    spec = bb.input_spec
    return {
        "policy": plan.policy,
        "weights_source": getattr(bb, "weights_source", "random init"),
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
    }


def _fmt(n: int) -> str:
    return f"{n:,}"


def plan_report(model, plan: FreezePlan, as_json: bool = False) -> str:
    """Human-readable (or JSON) report of blocks, parameter counts, optimizer groups, BN layers
    kept in eval, input size/normalization and the weights source."""
    d = plan_data(model, plan)
    if as_json:
        return json.dumps(d, indent=2)
    inp = d["input"]
    mean = ", ".join(f"{m:.3f}" for m in inp["mean"])
    std = ", ".join(f"{s:.3f}" for s in inp["std"])
    lines = [
        f"freeze policy: {d['policy']}",
        f"weights:       {d['weights_source']}",
        f"input:         {inp['size']}x{inp['size']} x{inp['channels']} channels, mean ({mean}), std ({std})"
        + ("" if inp["resize"] else ", native size"),
        f"features:      {d['feature_dim']}",
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


def plan_text(cfg, as_json: bool) -> str:
    """``tlbench plan``: build the model and freeze plan (data only for the task sizes)."""
    from .build import build_everything, seed_everything

    seed_everything(cfg.seed)
    _, model, plan = build_everything(cfg)
    return plan_report(model, plan, as_json)
