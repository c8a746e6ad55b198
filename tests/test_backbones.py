"""Every torchvision/timm backbone config in conf/model/: build (random init), blocks, forward+backward."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tlbench.config import ModelConfig
from tlbench.errors import TlbenchError
from tlbench.models.backbones import BACKBONE_NAMES, build_backbone
from tlbench.models.base import TLModel

CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
NAMES = sorted(p.stem for p in CONF.glob("*.yaml") if p.stem in BACKBONE_NAMES)
ARCH = {"torchvision": "mobilenet_v3_small", "timm": "test_vit"}  # small stand-ins for the generic ones
SIZE = 32

# name -> (first block, last block, number of blocks, feature_dim)
EXPECTED = {
    "vgg16": ("features.0", "features.28", 13, 512),
    "vgg16_bn": ("features.0", "features.40", 13, 512),
    "vgg19": ("features.0", "features.34", 16, 512),
    "vgg19_bn": ("features.0", "features.49", 16, 512),
    "densenet201": ("features.conv0", "features.denseblock4.denselayer32", 39, 1920),
    "resnet18": ("conv1", "layer4", 5, 512),
    "resnet50": ("conv1", "layer4", 5, 2048),
    "deit_base_distilled": ("blocks.0", "blocks.11", 12, 768),
    "cait_s24": ("blocks.0", "blocks_token_only.1", 26, 384),
    "deit_tiny": ("blocks.0", "blocks.11", 12, 192),
    "efficientnet_lite0": ("conv_stem", "conv_head", 9, 1280),
    "efficientnet_lite1": ("conv_stem", "conv_head", 9, 1280),
    "efficientnet_lite2": ("conv_stem", "conv_head", 9, 1280),
    "torchvision": ("features.0", "classifier", 14, 1024),
    "timm": ("blocks.0", "blocks.5", 6, 64),
}


def model_cfg(name: str, **kw) -> ModelConfig:
    """The shipped conf/model/<name>.yaml, made offline and small."""
    d = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    d.update(pretrained=False, image_size=SIZE)
    if name in ARCH:
        d["arch"] = ARCH[name]
    d.update(kw)
    return ModelConfig(**d)


@functools.lru_cache(maxsize=None)
def built(name: str):
    """Each backbone is built once per test session (the big ones cost seconds)."""
    torch.manual_seed(0)
    return build_backbone(model_cfg(name))


def test_every_backbone_has_a_config():
    assert set(NAMES) == set(BACKBONE_NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_config_keys_are_model_keys_with_comments(name):
    text = (CONF / f"{name}.yaml").read_text()
    keys = set(yaml.safe_load(text))
    assert keys <= set(ModelConfig.__dataclass_fields__)
    assert yaml.safe_load(text)["name"] == name
    for line in text.splitlines():
        if line and not line.startswith("#"):
            assert "#" in line, f"{name}.yaml: key without a comment: {line}"


@pytest.mark.parametrize("name", NAMES)
def test_blocks(name):
    bb = built(name)
    blocks = bb.blocks()
    first, last, n, dim = EXPECTED[name]
    names = list(blocks)
    assert (names[0], names[-1], len(names)) == (first, last, n)
    assert bb.feature_dim == dim
    seen: set[int] = set()
    for bname, mod in blocks.items():
        bb.net.get_submodule(bname)  # names are module paths inside backbone.net
        ids = {id(p) for p in mod.parameters()}
        assert ids and not ids & seen, f"{bname}: empty or overlapping"
        seen |= ids


def test_block_details():
    assert "features.denseblock4.denselayer16" in built("densenet201").blocks()
    cait = list(built("cait_s24").blocks())
    assert cait[23:] == ["blocks.23", "blocks_token_only.0", "blocks_token_only.1"]
    deit = built("deit_tiny")  # a ViT's final norm goes with its last block
    last = {id(p) for p in deit.blocks()["blocks.11"].parameters()}
    assert {id(p) for p in deit.net.norm.parameters()} <= last
    vgg = built("vgg16_bn")  # a conv's BatchNorm belongs to its block
    assert {id(p) for p in vgg.net.features[41].parameters()} <= {id(p) for p in vgg.blocks()["features.40"].parameters()}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    bb = built(name)
    assert bb.input_spec.size == SIZE and bb.input_spec.channels == 3
    model = TLModel(bb, {"a": 3, "b": 2})
    model.train()
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    lead = (2,) if bb.num_feature_outputs == 2 else ()  # distilled: (cls, dist) logits in training
    assert out["a"].shape == (*lead, 2, 3) and out["b"].shape == (*lead, 2, 2)
    (out["a"].sum() + out["b"].sum()).backward()
    last = list(bb.blocks().values())[-1]
    assert all(p.grad is not None for p in last.parameters())
    assert model.heads["a"].weight.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(x)["a"].shape == (2, 3)
    model.zero_grad(set_to_none=True)


def test_distilled_deit_has_two_heads():
    model = TLModel(built("deit_base_distilled"), {"label": 10})
    assert model.heads_dist is not None and model.backbone.num_feature_outputs == 2


def test_input_spec_defaults():
    rn = build_backbone(model_cfg("resnet18", image_size=None))
    assert rn.input_spec.size == 224 and rn.input_spec.mean == (0.485, 0.456, 0.406)
    lite = build_backbone(model_cfg("efficientnet_lite0", image_size=None))
    assert lite.input_spec.size == 224 and lite.input_spec.mean == (0.5, 0.5, 0.5)


def test_vit_image_size():
    bb = build_backbone(model_cfg("deit_tiny", image_size=64))
    assert bb.net.pos_embed.shape[1] == (64 // 16) ** 2 + 1
    assert bb(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_truncate_vgg_is_features_prefix():
    bb = build_backbone(model_cfg("vgg16", truncate="features.7"))
    kept = [i for i, m in enumerate(bb.net.features) if not isinstance(m, nn.Identity)]
    assert kept == list(range(10))  # VGG16 features[:10]
    assert list(bb.blocks())[-1] == "features.7" and bb.feature_dim == 128
    x = torch.randn(2, 3, SIZE, SIZE)
    ref = nn.Sequential(*bb.net.features[:10])(x).mean((2, 3))
    assert torch.allclose(bb(x), ref)


@pytest.mark.parametrize(
    "name,block,dim,n_blocks",
    [
        ("resnet18", "layer3", 256, 4),
        ("densenet201", "features.denseblock4.denselayer16", 896 + 16 * 32, 23),
        ("deit_tiny", "blocks.5", 192, 6),
        ("cait_s24", "blocks.10", 384, 13),  # the class-attention blocks stay
        ("efficientnet_lite0", "blocks.3", 80, 5),
    ],
)
def test_truncate(name, block, dim, n_blocks):
    bb = build_backbone(model_cfg(name, truncate=block))
    assert bb.feature_dim == dim and len(bb.blocks()) == n_blocks
    out = bb(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, dim)


def test_truncate_unknown_block_lists_blocks():
    with pytest.raises(TlbenchError, match=r"layer9.*layer1, layer2"):
        build_backbone(model_cfg("resnet18", truncate="layer9"))


def test_in_chans_1():
    bb = build_backbone(model_cfg("resnet18", in_chans=1))
    assert bb.net.conv1.in_channels == 1 and bb.input_spec.channels == 1 and len(bb.input_spec.mean) == 1
    assert bb(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 512)
    vit = build_backbone(model_cfg("deit_tiny", in_chans=1))
    assert vit(torch.randn(2, 1, SIZE, SIZE)).shape == (2, 192)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(name="vgg17"), r"vgg17.*'cait_s24'.*'timm'.*'vgg16'"),
        (dict(name="torchvision"), r"needs model.arch"),
        (dict(name="torchvision", arch="resnet19"), r"resnet19.*'resnet18'"),
        (dict(name="timm", arch="deit_tiny_patch16"), r"close names: .*deit_tiny_patch16_224"),
        (dict(name="vgg16", arch="resnet18"), r"conflicts with model.name=vgg16"),
        (dict(name="resnet18", weights="a.pth", init_from="run"), r"both set"),
    ],
)
def test_errors(kw, match):
    with pytest.raises(TlbenchError, match=match):
        build_backbone(ModelConfig(**kw))


def test_generic_timm_blocks_follow_timms_group_matcher():
    """model=timm: the blocks are timm's group_matcher groups in forward order. CoaT registers
    every patch embedding before any block, so its registration order (the slots) is not its
    forward order; each block is named after its first module path and holds the rest. (CoaT's
    serial blocks reuse the stage's cpe/crpe modules, so those parameters are in two blocks.)"""
    bb = build_backbone(ModelConfig(name="timm", arch="coat_lite_tiny", pretrained=False))
    assert list(bb.blocks()) == [name for k in range(1, 5)
                                 for name in (f"patch_embed{k}", f"serial_blocks{k}.0", f"serial_blocks{k}.1")]
    spec = dict(bb.block_spec)
    assert spec["patch_embed2"] == ["patch_embed2", "cpe2", "crpe2"] and "norm4" in spec["serial_blocks4.1"]
    for _, paths in bb.block_spec:
        for p in paths:
            bb.net.get_submodule(p)
