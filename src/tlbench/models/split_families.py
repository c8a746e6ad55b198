"""Split adapters: each backbone family's forward as named steps (used by :mod:`.split`).

A step is a small ``nn.Module`` that registers the backbone's own submodules and parameters
(shared, never copied; a step's parameters are exactly those it uses). The generic mechanism,
:func:`sequential_steps`, runs the backbone's stage slots in order, then pools/flattens like
:class:`~tlbench.models.backbones.NetBackbone`; :data:`FAMILIES` holds one adapter per family
whose forward is not just that chain (docs/architecture.md says how a family is added).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from .base import Backbone

Steps = list[tuple[str, nn.Module]]  # [(step name, module)], in forward order
Output = Union[torch.Tensor, tuple[torch.Tensor, ...]]


# ----------------------------------------------------------------------------- steps
class _Finish(nn.Module):
    """What NetBackbone.forward does to the network's output: global average pool if 4-d, flatten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean((2, 3))
        return x.flatten(1)


class _PoolFlatten(nn.Module):
    """The scratch CNN's tail: its pool, then flatten."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x).flatten(1)


class _DenseCarry(nn.Module):
    """One layer of a DenseNet ``_DenseBlock``: ``h`` is the concatenation of the block input and
    every earlier layer's output (what ``_DenseBlock`` keeps as a list); the layer's new
    features are appended. After the block's last layer ``h`` is the block's output."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([h, self.layer(h)], 1)


class _DenseNetPool(nn.Module):
    """torchvision DenseNet after ``features``: relu, global average pool, flatten."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.relu(x)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)


class _HeadDropout(nn.Module):
    """timm EfficientNet's ``forward_head`` dropout (functional there, a step here)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, p=self.p, training=self.training) if self.p > 0 else x


def _register(step: nn.Module, net: nn.Module, modules: Sequence[str] = (), params: Sequence[str] = ()) -> None:
    """Register the parts of ``net`` a step uses (shared, not copied): they are its parameters,
    and they follow its train/eval mode."""
    for name in modules:
        m = getattr(net, name, None)
        if isinstance(m, nn.Module):
            step.add_module(name, m)
    for name in params:
        p = getattr(net, name, None)
        if isinstance(p, nn.Parameter):
            step.register_parameter(name, p)


class _VitStem(nn.Module):
    """timm ViT ``forward_features`` before the blocks: patch embedding, class (and distillation,
    register) tokens with the position embedding (the net's own ``_pos_embed``), norm_pre."""

    def __init__(self, net: nn.Module):
        super().__init__()
        _register(self, net, ("patch_embed", "pos_drop", "patch_drop", "norm_pre"),
                  ("cls_token", "dist_token", "reg_token", "pos_embed"))
        self._pos_embed = net._pos_embed  # a bound method: the net itself stays unregistered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._pos_embed(self.patch_embed(x))
        return self.norm_pre(self.patch_drop(x))


class _VitHead(nn.Module):
    """After the blocks: final norm, then the two tokens (distilled DeiT, as NetBackbone returns
    them) or timm's ``forward_head`` (pooling, fc_norm; the classifier is Identity)."""

    def __init__(self, net: nn.Module, distilled: bool):
        super().__init__()
        _register(self, net, ("norm", "attn_pool", "fc_norm", "head_drop", "head"))
        self.distilled = distilled
        self._forward_head = net.forward_head
        self.finish = _Finish()

    def forward(self, x: torch.Tensor) -> Output:
        x = self.norm(x)
        if self.distilled:
            return x[:, 0], x[:, 1]
        return self.finish(self._forward_head(x))


class _CaitStem(nn.Module):
    """CaiT before its blocks: patch embedding plus position embedding (no class token yet)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        _register(self, net, ("patch_embed", "pos_drop"), ("pos_embed",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)


class _CaitClsToken(nn.Module):
    """Put the class token in front of the patch tokens: ``h = [cls; x]`` from here on."""

    def __init__(self, net: nn.Module):
        super().__init__()
        _register(self, net, params=("cls_token",))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)


class _CaitClassAttention(nn.Module):
    """A class-attention block on ``h = [cls; x]``: the class token attends to the patch tokens."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        cls, x = h[:, :1], h[:, 1:]
        return torch.cat((self.block(x, cls), x), dim=1)


class _CaitHead(nn.Module):
    """CaiT's final norm and ``forward_head`` (class token or mean of the patch tokens)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        _register(self, net, ("norm", "head_drop", "head"))
        self._forward_head = net.forward_head
        self.finish = _Finish()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish(self._forward_head(self.norm(x)))


# ----------------------------------------------------------------------------- families
def sequential_steps(
    bb: Backbone,
    before: Optional[dict[str, nn.Module]] = None,
    after: Optional[dict[str, nn.Module]] = None,
    wrap: Optional[Callable[[str, nn.Module], nn.Module]] = None,
) -> Steps:
    """The generic mechanism: the network's slots (the members of ``bb.block_spec`` in order,
    then the top-level children after them -- a pool or a removed layer left by truncation)
    run one after the other, then :class:`_Finish`. ``before``/``after`` insert steps around
    a slot (named by its path); ``wrap(path, module)`` replaces a slot's module."""
    net = bb.net
    paths = [p for _, ps in bb.block_spec for p in ps]
    tops = [n for n, _ in net.named_children()]
    last = max((tops.index(p.split(".")[0]) for p in paths if p.split(".")[0] in tops), default=-1)
    paths += tops[last + 1 :]
    before, after = before or {}, after or {}
    steps: Steps = []
    for p in paths:
        if p in before:
            steps.append((f"{p}:before", before[p]))
        m = net.get_submodule(p)
        steps.append((p, wrap(p, m) if wrap else m))
        if p in after:
            steps.append((f"{p}:after", after[p]))
    steps.append(("finish", _Finish()))
    return steps


def _scratch_cnn(bb) -> Steps:
    return [(f"stages.{i}", m) for i, m in enumerate(bb.stages)] + [("pool", _PoolFlatten(bb.pool))]


def _scratch_mlp(bb) -> Steps:
    return [("flatten", nn.Flatten(1))] + [(f"layers.{i}", m) for i, m in enumerate(bb.layers)]


def _torchvision_plain(bb) -> Steps:  # ResNet, VGG: layers, avgpool, torch.flatten(x, 1), classifier
    return sequential_steps(bb, after={"avgpool": nn.Flatten(1)})


def _densenet(bb) -> Steps:
    from torchvision.models.densenet import _DenseBlock

    def wrap(path: str, m: nn.Module) -> nn.Module:
        parent = path.rpartition(".")[0]
        return _DenseCarry(m) if parent and isinstance(bb.net.get_submodule(parent), _DenseBlock) else m

    return sequential_steps(bb, before={"classifier": _DenseNetPool()}, wrap=wrap)


def _efficientnet(bb) -> Steps:
    return sequential_steps(bb, before={"classifier": _HeadDropout(float(getattr(bb.net, "drop_rate", 0.0)))})


def _vit(bb) -> Steps:
    net = bb.net
    return ([("patch_embed", _VitStem(net))]
            + [(f"blocks.{k}", m) for k, m in net.blocks.named_children()]
            + [("head", _VitHead(net, bb.num_feature_outputs == 2))])


def _cait(bb) -> Steps:
    net = bb.net
    steps = [("patch_embed", _CaitStem(net))] + [(f"blocks.{k}", m) for k, m in net.blocks.named_children()]
    if net.blocks_token_only is not None:
        steps.append(("cls_token", _CaitClsToken(net)))
        steps += [(f"blocks_token_only.{k}", _CaitClassAttention(m)) for k, m in net.blocks_token_only.named_children()]
    return steps + [("head", _CaitHead(net))]


def _classes(*where: str) -> Callable[[], tuple[type, ...]]:
    """``_classes("module:Class", ...)``: those classes whose module is imported already (a network
    of a library that was never imported cannot be an instance, so nothing is imported here)."""

    def get() -> tuple[type, ...]:
        found = (getattr(sys.modules.get(m), c, None) for m, _, c in (w.partition(":") for w in where))
        return tuple(c for c in found if isinstance(c, type))

    return get


@dataclass(frozen=True)
class Family:
    """A split adapter: ``steps(backbone)`` for backbones (``on="backbone"``) or wrapped networks
    (``on="net"``) that are instances of ``classes()``. Exact instances are trusted (the tests
    prove them); subclasses must reproduce the backbone's output on a probe input."""

    name: str
    classes: Callable[[], tuple[type, ...]]
    steps: Callable[[Backbone], Steps]
    on: str = "net"


FAMILIES: list[Family] = [
    Family("scratch CNN", _classes("tlbench.models.scratch:ScratchCNN"), _scratch_cnn, on="backbone"),
    Family("scratch MLP", _classes("tlbench.models.scratch:ScratchMLP"), _scratch_mlp, on="backbone"),
    Family("timm ViT/DeiT", _classes("timm.models.vision_transformer:VisionTransformer",
                                     "timm.models.deit:VisionTransformerDistilled"), _vit),
    Family("timm CaiT", _classes("timm.models.cait:Cait"), _cait),
    Family("timm EfficientNet", _classes("timm.models.efficientnet:EfficientNet"), _efficientnet),
    Family("torchvision DenseNet", _classes("torchvision.models.densenet:DenseNet"), _densenet),
    Family("torchvision ResNet/VGG", _classes("torchvision.models.resnet:ResNet", "torchvision.models.vgg:VGG"),
           _torchvision_plain),
]


def has_adapter(net: nn.Module) -> bool:
    """Whether a wrapped network is an instance of a family with a split adapter (its block names
    are the ones the adapter's steps use)."""
    return any(fam.on == "net" and fam.classes() and isinstance(net, fam.classes()) for fam in FAMILIES)
