"""Freeze policies -> FreezePlan: requires_grad, BatchNorm in eval, optimizer groups, the report."""

from __future__ import annotations

import json

import pytest
import torch

from tlbench.config import FreezeConfig, ModelConfig, OptimConfig
from tlbench.errors import TlbenchError
from tlbench.freeze import POLICIES, apply_freeze, gradual_unfreeze, set_bn_eval
from tlbench.models.backbones import build_backbone
from tlbench.models.base import TLModel
from tlbench.plan import plan_report

OPT = OptimConfig(lr=1.0)
SIZE = 32


def make(name: str, arch: str | None = None, tasks=None) -> TLModel:
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(name=name, arch=arch, image_size=SIZE))
    return TLModel(bb, tasks or {"label": 10})


@pytest.fixture(scope="module")
def resnet():
    return make("resnet18")


@pytest.fixture(scope="module")
def deit():
    return make("deit_tiny")


def n_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def numel(module) -> int:
    return sum(p.numel() for p in module.parameters())


def block(model, name):
    return model.backbone.blocks()[name]


def test_full_and_linear_probe(resnet):
    plan = apply_freeze(resnet, FreezeConfig(name="full"), OPT)
    assert plan.trainable_count == plan.total == n_trainable(resnet) == numel(resnet)
    assert plan.bn_eval == [] and plan.frozen == []
    plan = apply_freeze(resnet, FreezeConfig(name="linear_probe"), OPT)
    assert plan.trainable_count == n_trainable(resnet) == numel(resnet.heads) == 512 * 10 + 10
    assert all(n.startswith("heads.") for n in plan.trainable)
    assert len(plan.bn_eval) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in resnet.modules())


def test_last_block_resnet(resnet):
    plan = apply_freeze(resnet, FreezeConfig(name="last_block"), OPT)
    assert plan.trainable_count == numel(resnet.backbone.net.layer4) + numel(resnet.heads)
    assert [b["name"] for b in plan.blocks if b["trainable"]] == ["layer4"]
    assert not any(n.startswith("backbone.net.layer4") for n in plan.bn_eval)
    assert "backbone.net.layer3.1.bn2" in plan.bn_eval


def test_last_block_vit_takes_final_norm_not_tokens(deit):
    plan = apply_freeze(deit, FreezeConfig(name="last_block"), OPT)
    net = deit.backbone.net
    assert plan.trainable_count == numel(net.blocks[11]) + numel(net.norm) + numel(deit.heads)
    assert not net.cls_token.requires_grad and not net.pos_embed.requires_grad
    assert plan.outside["n_params"] == numel(net.patch_embed) + net.cls_token.numel() + net.pos_embed.numel()


def test_distilled_heads_both_train():
    model = make("timm", arch="deit_tiny_distilled_patch16_224")
    plan = apply_freeze(model, FreezeConfig(name="linear_probe"), OPT)
    assert plan.trainable_count == numel(model.heads) + numel(model.heads_dist) == 2 * (192 * 10 + 10)
    plan = apply_freeze(model, FreezeConfig(name="last_block", head=False), OPT)
    assert not any(n.startswith("heads") for n in plan.trainable)


def test_pattern(resnet, deit):
    plan = apply_freeze(resnet, FreezeConfig(name="pattern", train=("layer4.1.*", "net.layer3")), OPT)
    want = numel(resnet.backbone.net.layer4[1]) + numel(resnet.backbone.net.layer3) + numel(resnet.heads)
    assert plan.trainable_count == want
    plan = apply_freeze(deit, FreezeConfig(name="pattern", train=("blocks.1[01]", "norm.*", "cls_token")), OPT)
    net = deit.backbone.net
    want = numel(net.blocks[10]) + numel(net.blocks[11]) + numel(net.norm) + net.cls_token.numel() + numel(deit.heads)
    assert plan.trainable_count == want


def test_pattern_block_name_takes_whole_block():
    model = make("efficientnet_lite0")
    plan = apply_freeze(model, FreezeConfig(name="pattern", train=("conv_head",)), OPT)
    net = model.backbone.net
    assert net.bn2.weight.requires_grad  # conv_head's BatchNorm is part of block conv_head
    assert plan.trainable_count == numel(net.conv_head) + numel(net.bn2) + numel(model.heads)
    assert "backbone.net.bn2" not in plan.bn_eval and "backbone.net.bn1" in plan.bn_eval


def test_index_and_first_n(resnet):
    net = resnet.backbone.net
    plan = apply_freeze(resnet, FreezeConfig(name="index", trainable_layers=(0, -1, -2)), OPT)
    assert [b["name"] for b in plan.blocks if b["trainable"]] == ["conv1", "layer3", "layer4"]
    assert plan.trainable_count == numel(block(resnet, "conv1")) + numel(net.layer3) + numel(net.layer4) + numel(resnet.heads)
    plan = apply_freeze(resnet, FreezeConfig(name="first_n", n=2), OPT)
    assert [b["trainable"] for b in plan.blocks] == [False, False, True, True, True]
    plan = apply_freeze(resnet, FreezeConfig(name="first_n", n=5), OPT)
    assert plan.trainable_count == numel(resnet.heads)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (FreezeConfig(name="pattern", train=("layer9*",)), r"'layer9\*' matches no.*0:conv1, 1:layer1, 2:layer2, 3:layer3, 4:layer4"),
        (FreezeConfig(name="pattern"), r"needs freeze.train.*4:layer4"),
        (FreezeConfig(name="index", trainable_layers=(5,)), r"index 5 is out of range \(-5..4\).*0:conv1"),
        (FreezeConfig(name="index", trainable_layers=(-6,)), r"index -6 is out of range"),
        (FreezeConfig(name="index"), r"needs freeze.trainable_layers"),
        (FreezeConfig(name="first_n", n=6), r"freeze.n=6 is out of range.*5 blocks"),
        (FreezeConfig(name="top_k"), r"'top_k' is not a freeze policy.*'first_n', 'full', 'index', 'last_block'"),
        (FreezeConfig(name="linear_probe", head=False), r"leaves nothing to train"),
    ],
)
def test_errors(resnet, cfg, match):
    with pytest.raises(TlbenchError, match=match):
        apply_freeze(resnet, cfg, OPT)


def _bn_stats(model):
    return {n: b.clone() for n, b in model.named_buffers() if "running" in n}


@pytest.mark.parametrize("bn,changes", [("eval", False), ("train", True)])
def test_frozen_bn_running_stats(bn, changes):
    model = make("resnet18")
    plan = apply_freeze(model, FreezeConfig(name="last_block", bn=bn), OptimConfig(name="sgd", lr=0.1))
    opt = torch.optim.SGD(plan.groups, lr=0.1)
    before = _bn_stats(model)
    model.train()
    set_bn_eval(model, plan)
    loss = model(torch.randn(4, 3, SIZE, SIZE) * 3 + 1)["label"].logsumexp(1).mean()
    loss.backward()
    opt.step()
    after = _bn_stats(model)
    frozen = [n for n in before if n.startswith("backbone.net.layer1")]
    assert all(torch.equal(before[n], after[n]) for n in frozen) != changes
    assert not torch.equal(before["backbone.net.layer4.1.bn2.running_mean"], after["backbone.net.layer4.1.bn2.running_mean"])


def test_layer_decay_and_head_lr(resnet):
    plan = apply_freeze(resnet, FreezeConfig(name="full"), OptimConfig(lr=1.0, layer_decay=0.5, head_lr=3.0))
    lrs = {g["name"]: g["lr"] for g in plan.groups}
    assert lrs == {"conv1": 0.0625, "layer1": 0.125, "layer2": 0.25, "layer3": 0.5, "layer4": 1.0, "heads": 3.0}
    plan = apply_freeze(resnet, FreezeConfig(name="last_block"), OptimConfig(lr=1.0, layer_decay=0.5))
    assert {g["name"]: g["lr"] for g in plan.groups} == {"layer4": 1.0, "heads": 1.0}
    assert sum(len(g["params"]) for g in plan.groups) == sum(p.requires_grad for p in resnet.parameters())


def test_vit_layer_decay_puts_tokens_below_first_block(deit):
    plan = apply_freeze(deit, FreezeConfig(name="full"), OptimConfig(lr=1.0, layer_decay=0.5))
    lrs = {g["name"]: g["lr"] for g in plan.groups}
    assert lrs["blocks.11"] == 1.0 and lrs["blocks.0"] == 0.5**11 and lrs["backbone.other"] == 0.5**12


def test_weight_decay_groups(resnet):
    plan = apply_freeze(resnet, FreezeConfig(name="last_block"), OptimConfig(lr=0.1, weight_decay=0.05))
    wd = {g["name"]: g["weight_decay"] for g in plan.groups}
    assert wd == {"backbone": 0.05, "backbone/no_decay": 0.0, "heads": 0.05, "heads/no_decay": 0.0}
    assert all(p.ndim <= 1 for g in plan.groups if g["name"].endswith("no_decay") for p in g["params"])
    torch.optim.AdamW(plan.groups, lr=0.1)  # the groups are ready for torch optimizers


def test_gradual_unfreeze():
    model = make("resnet18")
    cfg = FreezeConfig(name="linear_probe", gradual=2)
    apply_freeze(model, cfg, OPT)
    assert gradual_unfreeze(model, cfg, OPT, 1) is None
    plan = gradual_unfreeze(model, cfg, OPT, 2)
    assert [b["name"] for b in plan.blocks if b["trainable"]] == ["layer4"]
    assert gradual_unfreeze(model, cfg, OPT, 3) is None
    plan = gradual_unfreeze(model, cfg, OPT, 4)
    assert [b["name"] for b in plan.blocks if b["trainable"]] == ["layer3", "layer4"]
    assert plan.trainable_count == n_trainable(model)
    fresh = make("resnet18")  # a resumed run gets the epoch's set directly
    apply_freeze(fresh, cfg, OPT)
    assert gradual_unfreeze(fresh, cfg, OPT, 5).trainable_count == plan.trainable_count
    assert gradual_unfreeze(fresh, FreezeConfig(name="linear_probe"), OPT, 4) is None


def test_every_policy_has_a_config():
    from pathlib import Path

    import yaml

    conf = Path(__file__).resolve().parents[1] / "conf" / "freeze"
    assert {p.stem for p in conf.glob("*.yaml")} == set(POLICIES)
    for name in POLICIES:
        d = yaml.safe_load((conf / f"{name}.yaml").read_text())
        assert d["name"] == name
        FreezeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def test_plan_report(resnet):
    plan = apply_freeze(resnet, FreezeConfig(name="last_block"), OptimConfig(lr=0.01, head_lr=0.1))
    text = plan_report(resnet, plan, as_json=False)
    for needle in ("freeze policy: last_block", "layer4", "random init", "32x32", "0.485", "heads", "lr 0.1",
                   "BatchNorm kept in eval: 15", f"{plan.trainable_count:,} trainable"):
        assert needle in text, needle
    data = json.loads(plan_report(resnet, plan, as_json=True))
    assert data["params"] == {"total": plan.total, "trainable": plan.trainable_count}
    assert [g["lr"] for g in data["groups"]] == [0.01, 0.1]
    assert data["blocks"][-1] == {"name": "layer4", "n_params": numel(resnet.backbone.net.layer4),
                                  "n_trainable": numel(resnet.backbone.net.layer4), "trainable": True}


def test_freeze_groups_give_blocks_their_own_learning_rate():
    from tlbench.compose import compose
    from tlbench.run import build_everything

    cfg = compose(["freeze.groups=[stages.0:0.0001]", "optim.lr=0.01", "optim.head_lr=0.1"])
    _, _, plan = build_everything(cfg)
    lrs = {g["name"]: g["lr"] for g in plan.groups}
    assert lrs == {"stages.0": 0.0001, "backbone": 0.01, "heads": 0.1}
    n = {g["name"]: sum(p.numel() for p in g["params"]) for g in plan.groups}
    assert n["stages.0"] + n["backbone"] + n["heads"] == plan.trainable_count
    for bad, word in (("[nosuch*:0.1]", "matches no block"), ("[stages.0:fast]", "BLOCK_GLOB:LR")):
        with pytest.raises(TlbenchError, match=word):
            build_everything(compose([f"freeze.groups={bad}"]))
    with pytest.raises(TlbenchError, match="layer_decay"):
        build_everything(compose(["freeze.groups=[stages.0:0.001]", "optim.layer_decay=0.5"]))


@pytest.mark.parametrize("bn", ["eval", "train"])
def test_linear_probe_bn_setting_means_what_it_says(cli, bn):
    """freeze=linear_probe with freeze.bn=train: the frozen backbone's BatchNorm statistics do
    update (and its features are therefore not cached); with bn=eval they stay bit-equal."""
    import torch

    code, rd = cli("freeze=linear_probe", f"freeze.bn={bn}", "trainer.max_epochs=1", "trainer.batch_size=128")
    assert code == 0
    first, best = (torch.load(rd / "checkpoints" / f, weights_only=True)["model"] for f in ("last.prev.pt", "best.pt"))
    stats = [k for k in best if k.startswith("backbone.") and k.endswith("running_mean")]
    assert stats
    same = all(torch.equal(first[k], best[k]) for k in stats)
    res = json.loads((rd / "results.json").read_text())
    if bn == "eval":
        assert same and res["time"]["feature_cache_s"] is not None
    else:
        assert not same and res["time"]["feature_cache_s"] is None
