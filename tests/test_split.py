"""Split execution (#12, part 1): ``suffix(prefix(x)) == backbone(x)`` for every family at several
block boundaries, the parts share the backbone's parameters, ``split_point`` for the freeze
policies, FLOPs of prefix and suffix."""

from __future__ import annotations

import functools
import re

import pytest
import torch
from torch import nn

from tlbench.config import FreezeConfig, ModelConfig, OptimConfig
from tlbench.freeze import apply_freeze
from tlbench.models import build_backbone
from tlbench.models.backbones import NetBackbone
from tlbench.models.base import InputSpec, TLModel
from tlbench.models.split import (
    RTOL,
    SplitUnsupported,
    flops,
    program,
    relative_error,
    split_backbone,
    split_point,
)

SIZE = 32
SCRATCH_SIZE = 12

# case -> (ModelConfig fields, blocks to split at: the last block first)
CASES = {
    "cnn": (dict(name="cnn", channels=(8, 16, 16)), ["stages.2", "stages.1"]),
    "mlp": (dict(name="mlp", hidden=(32, 16, 8)), ["layers.2", "layers.1"]),
    "vgg11": (dict(name="torchvision", arch="vgg11"), ["features.18", "features.8"]),
    "vgg16_bn": (dict(name="vgg16_bn"), ["features.40", "features.20"]),
    "resnet18": (dict(name="resnet18"), ["layer4", "layer2", "conv1"]),
    "densenet121": (dict(name="torchvision", arch="densenet121"),
                    ["features.denseblock4.denselayer16", "features.denseblock4.denselayer1",
                     "features.denseblock2"]),
    "densenet201": (dict(name="densenet201"),
                    ["features.denseblock4.denselayer32", "features.denseblock4.denselayer16"]),
    "deit_tiny_distilled": (dict(name="timm", arch="deit_tiny_distilled_patch16_224"),
                            ["blocks.11", "blocks.5", "blocks.0"]),
    "deit_tiny": (dict(name="deit_tiny"), ["blocks.11", "blocks.3"]),
    "cait_xxs24": (dict(name="timm", arch="cait_xxs24_224"),
                   ["blocks_token_only.1", "blocks_token_only.0", "blocks.23", "blocks.10"]),
    "efficientnet_lite0": (dict(name="efficientnet_lite0"), ["conv_head", "blocks.6", "blocks.2"]),
    # no adapter: the generic mechanism, accepted after a probe forward
    "mobilenet_v3_small": (dict(name="torchvision", arch="mobilenet_v3_small"),
                           ["classifier", "features.12", "features.6"]),
    # truncated backbones (model.truncate): the cut layers are Identity / deleted
    "resnet18_cut": (dict(name="resnet18", truncate="layer3"), ["layer3", "layer1"]),
    "densenet121_cut": (dict(name="torchvision", arch="densenet121", truncate="features.denseblock4.denselayer8"),
                        ["features.denseblock4.denselayer8", "features.denseblock4.denselayer2"]),
    "deit_tiny_cut": (dict(name="deit_tiny", truncate="blocks.5"), ["blocks.5"]),
    "cait_xxs24_cut": (dict(name="timm", arch="cait_xxs24_224", truncate="blocks.10"),
                       ["blocks_token_only.0", "blocks.10"]),
    "efficientnet_lite0_cut": (dict(name="efficientnet_lite0", truncate="blocks.3"), ["blocks.3", "blocks.1"]),
}
FAMILY = {"cnn": "scratch CNN", "mlp": "scratch MLP", "vgg11": "torchvision ResNet/VGG",
          "vgg16_bn": "torchvision ResNet/VGG", "resnet18": "torchvision ResNet/VGG",
          "densenet121": "torchvision DenseNet", "densenet201": "torchvision DenseNet",
          "deit_tiny_distilled": "timm ViT/DeiT", "deit_tiny": "timm ViT/DeiT", "cait_xxs24": "timm CaiT",
          "efficientnet_lite0": "timm EfficientNet", "mobilenet_v3_small": "generic (MobileNetV3)"}


def size_of(case: str) -> int:
    return SCRATCH_SIZE if CASES[case][0]["name"] in ("cnn", "mlp") else SIZE


def new_backbone(case: str):
    fields = dict(CASES[case][0])
    if fields["name"] not in ("cnn", "mlp"):
        fields.update(pretrained=False, image_size=SIZE)
    torch.manual_seed(0)
    bb = build_backbone(ModelConfig(**fields))
    if fields["name"] == "mlp":  # materialize the lazy first layer
        with torch.no_grad():
            bb(torch.zeros(1, 3, SCRATCH_SIZE, SCRATCH_SIZE))
    _perturb(bb)
    return bb


@functools.lru_cache(maxsize=None)
def built(case: str):
    return new_backbone(case).eval()


def _perturb(bb: nn.Module) -> None:
    """Random init leaves BatchNorm an identity (mean 0, var 1), LayerNorm plain and CaiT's layer
    scales at 1e-5, so a skipped norm or block would pass a 1e-5 test: make all of them matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in bb.named_parameters():
            if p.ndim <= 1 or "gamma" in name:
                if name.endswith("bias"):
                    p.copy_(torch.rand(p.shape, generator=g) * 0.4 - 0.2)
                elif name.endswith("weight") or "gamma" in name:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for m in bb.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.running_mean is not None:
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def image(case: str, n: int = 2) -> torch.Tensor:
    s = size_of(case)
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(2))


SPLITS = [(case, block) for case, (_, blocks) in CASES.items() for block in blocks]


@pytest.mark.parametrize("case,block", SPLITS, ids=[f"{c}@{b}" for c, b in SPLITS])
def test_suffix_of_prefix_is_the_forward(case, block):
    bb = built(case)
    x = image(case)
    prefix, suffix = split_backbone(bb, block)
    with torch.no_grad():
        ref = bb(x)
        h = prefix(x)
        assert isinstance(h, torch.Tensor)  # one tensor to store, whatever the family
        kept = h.clone()
        out = suffix(h)
    assert type(out) is type(ref)  # a (cls, dist) pair for distilled DeiT, like the backbone
    assert relative_error(out, ref) <= RTOL, (case, block, relative_error(out, ref))
    assert torch.equal(h, kept)  # the suffix never writes into a stored prefix output


@pytest.mark.parametrize("case", list(CASES))
def test_parts_share_the_backbone_parameters(case):
    bb = built(case)
    prog = program(bb)
    if case in FAMILY:
        assert prog.family == FAMILY[case]
        assert prog.verified == (case != "mobilenet_v3_small")
    own = {id(p) for p in bb.parameters()}
    assert set(prog.starts) == set(bb.blocks())  # every block is a possible split point
    for block in CASES[case][1]:
        prefix, suffix = split_backbone(bb, block)
        pre, suf = {id(p) for p in prefix.parameters()}, {id(p) for p in suffix.parameters()}
        assert pre | suf == own  # every parameter runs, and it is the backbone's own tensor (no copy)
        assert not pre & suf
        first = bb.blocks()[block]
        assert {id(p) for p in first.parameters()} <= suf


@pytest.mark.parametrize("case,block", [("resnet18", "layer3"), ("deit_tiny_distilled", "blocks.10"),
                                        ("densenet121", "features.denseblock4.denselayer15"),
                                        ("cait_xxs24", "blocks_token_only.0")])
def test_training_through_the_suffix_gives_the_same_gradients(case, block):
    bb = new_backbone(case).train()  # batch statistics in BatchNorm
    x = image(case, 4)
    weights = torch.Generator().manual_seed(3)

    def loss(out):
        out = torch.cat(out, 1) if isinstance(out, tuple) else out
        return (out * torch.randn(out.shape, generator=weights)).sum()

    prefix, suffix = split_backbone(bb, block)
    loss(bb(x)).backward()
    ref = {id(p): p.grad.clone() for p in suffix.parameters()}
    bb.zero_grad(set_to_none=True)
    weights.manual_seed(3)
    with torch.no_grad():
        h = prefix(x)
    loss(suffix(h)).backward()
    for p in suffix.parameters():
        assert relative_error(p.grad, ref[id(p)]) <= 1e-4
    assert all(p.grad is None for p in prefix.parameters())


# ----------------------------------------------------------------------------- split_point
OPT = OptimConfig()


@functools.lru_cache(maxsize=None)
def model(case: str) -> TLModel:
    return TLModel(built(case), {"label": 3})


def point(case: str, **freeze):
    m = model(case)
    plan = apply_freeze(m, FreezeConfig(**freeze), OPT)
    return split_point(m.backbone, plan.trainable, frozen_bn_eval=freeze.get("bn", "eval") == "eval")


@pytest.mark.parametrize(
    "case,freeze,block,reason",
    [
        ("resnet18", dict(name="last_block"), "layer4", r"everything before layer4 is frozen \(4 of 5 blocks\)"),
        ("resnet18", dict(name="first_n", n=2), "layer2", "before layer2"),
        ("resnet18", dict(name="index", trainable_layers=(-2, -1)), "layer3", "before layer3"),
        ("resnet18", dict(name="pattern", train=("layer4.1.*",)), "layer4", "before layer4"),
        ("resnet18", dict(name="full"), None, r"net.conv1.weight trains and nothing before it is frozen"),
        ("resnet18", dict(name="first_n", n=0), None, "nothing before it is frozen"),
        ("resnet18", dict(name="linear_probe"), None, "no backbone parameter trains"),
        ("resnet18", dict(name="pattern", train=("layer2*",)), None, "layer2 trains but layer3 is frozen after it"),
        ("resnet18", dict(name="index", trainable_layers=(1, -1)), None, "layer1 trains but layer2 is frozen"),
        ("resnet18", dict(name="last_block", bn="train"), None, r"freeze.bn=train"),
        ("vgg16_bn", dict(name="pattern", train=("features.3.*", "features.40*")), None,
         "features.3 trains but features.7 is frozen after it"),
        ("densenet121", dict(name="last_block"), "features.denseblock4.denselayer16", r"\(22 of 23 blocks\)"),
        ("densenet201", dict(name="pattern", train=("features.denseblock4.denselayer16*",)), None,
         "denselayer16 trains but features.denseblock4.denselayer17 is frozen after it"),
        ("deit_tiny_distilled", dict(name="last_block"), "blocks.11", "before blocks.11"),
        ("deit_tiny_distilled", dict(name="first_n", n=0), "blocks.0", r"\(0 of 12 blocks\)"),  # stem frozen
        ("deit_tiny_distilled", dict(name="pattern", train=("pos_embed", "blocks.11")), None,
         "net.pos_embed trains before the first block"),
        ("deit_tiny", dict(name="full"), None, "nothing before it is frozen"),
        ("cait_xxs24", dict(name="last_block"), "blocks_token_only.1", r"\(25 of 26 blocks\)"),
        ("cait_xxs24", dict(name="first_n", n=24), "blocks_token_only.0", "before blocks_token_only.0"),
        ("efficientnet_lite0", dict(name="last_block"), "conv_head", "before conv_head"),
        ("efficientnet_lite0", dict(name="first_n", n=7), "blocks.6", "before blocks.6"),
        ("cnn", dict(name="last_block"), "stages.2", "before stages.2"),
        ("mlp", dict(name="first_n", n=1), "layers.1", "before layers.1"),
        ("mobilenet_v3_small", dict(name="last_block"), "classifier", "before classifier"),
    ],
)
def test_split_point(case, freeze, block, reason):
    got, why = point(case, **freeze)
    assert got == block, why
    assert re.search(reason, why), why


def test_split_point_name_forms_and_options():
    m = model("densenet201")
    plan = apply_freeze(m, FreezeConfig(name="pattern", train=("features.denseblock4.denselayer16*",)), OPT)
    layer16 = "features.denseblock4.denselayer16"
    # the frozen layers after it still run each step, but the prefix is a fixed function
    assert split_point(m.backbone, plan.trainable, require_suffix=False)[0] == layer16
    rel = [n[len("backbone."):] for n in plan.trainable if n.startswith("backbone.")]
    assert split_point(m.backbone, rel, require_suffix=False)[0] == layer16  # relative to the backbone
    assert split_point(m.backbone, [n[4:] for n in rel], require_suffix=False)[0] == layer16  # to the net
    assert split_point(m.backbone, None, require_suffix=False)[0] == layer16  # requires_grad as it is
    with pytest.raises(ValueError, match="not parameters of this backbone: layer9.weight"):
        split_point(m.backbone, ["layer9.weight"])


def test_split_point_refuses_a_random_prefix():
    bb = build_backbone(ModelConfig(name="cnn", channels=(8, 16), dropout=0.25))
    for p in bb.stages[0].parameters():
        p.requires_grad_(False)
    assert split_point(bb) == (None, "the frozen prefix is random in training: stages.0.4 (p=0.25)")


# ----------------------------------------------------------------------------- errors, FLOPs
class _NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.a(x) + self.b(x)  # two branches: not "a, then b"


def test_a_network_the_generic_mechanism_cannot_run_is_refused():
    bb = NetBackbone(_NotSequential(), [("a", ["a"]), ("b", ["b"])], InputSpec(size=8), "random init")
    with pytest.raises(SplitUnsupported, match=r"generic \(_NotSequential\).*add an adapter"):
        split_backbone(bb, "b")
    block, why = split_point(bb, ["b.weight"])
    assert block is None and "add an adapter" in why


def test_a_sequential_network_without_an_adapter_is_split_after_a_probe():
    torch.manual_seed(0)  # no pooling of its own: NetBackbone (and the suffix) average the 4-d output
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 5, 1))
    bb = NetBackbone(net, [("0", ["0", "1"]), ("2", ["2"]), ("3", ["3"])], InputSpec(size=8), "random init").eval()
    assert program(bb).family == "generic (Sequential)" and not program(bb).verified
    x = torch.randn(2, 3, 8, 8)
    for block in ("3", "2"):
        prefix, suffix = split_backbone(bb, block)
        assert relative_error(suffix(prefix(x)), bb(x)) <= RTOL
    assert split_point(bb, ["3.weight", "3.bias"]) == ("3", "everything before 3 is frozen (2 of 3 blocks): it can run once")


def test_unknown_block_lists_the_blocks():
    with pytest.raises(ValueError, match=r"'layer9' is not a block .*conv1, layer1, layer2, layer3, layer4"):
        split_backbone(built("resnet18"), "layer9")


def test_flops_of_prefix_and_suffix():
    from torch.utils.flop_counter import FlopCounterMode

    bb = built("resnet18")
    with FlopCounterMode(display=False) as whole, torch.no_grad():
        bb(torch.zeros(1, 3, SIZE, SIZE))
    f = flops(bb, "layer4")
    assert f.prefix > 0 and f.suffix > 0 and f.total == whole.get_total_flops()
    assert f.expected_speedup() == pytest.approx((f.prefix + 3 * f.suffix) / (3 * f.suffix))
    p, s = f.prefix, f.suffix  # evaluated images gain more: no backward in the suffix
    assert f.expected_speedup(n_train=9, n_eval=1) == pytest.approx((9 * (p + 3 * s) + p + s) / (9 * 3 * s + s))
    assert flops(bb, "conv1").prefix == 0
    assert flops(bb, "layer4", input_size=64).total == 4 * f.total
    # attention is counted on CPU too: one ViT block is 24*N*D^2 + 4*N^2*D (N tokens, width D)
    n, d = (SIZE // 16) ** 2 + 1, 192
    assert flops(built("deit_tiny"), "blocks.11").suffix == 24 * n * d * d + 4 * n * n * d
    assert flops(built("cnn"), "stages.2", input_size=SCRATCH_SIZE).suffix > 0


def test_flops_keep_each_module_mode():
    bb = new_backbone("resnet18").train()
    bb.net.bn1.eval()  # a frozen BatchNorm (set_bn_eval)
    flops(bb, "layer4")
    assert bb.training and bb.net.layer4.training and not bb.net.bn1.training
