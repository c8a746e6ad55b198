"""Split execution: a backbone run as ``prefix(x) -> h`` and ``suffix(h) -> features``.

When only the last blocks of a backbone train, everything before the first trainable block
is a fixed function of the image, so it can run once and be stored (issue #12). This module
cuts a built :class:`~tlbench.models.base.Backbone` at a block boundary:

- :func:`program` turns the backbone into a list of named *steps* (small modules that share
  the backbone's own submodules and parameters, nothing is copied) whose composition is the
  backbone's forward. Every block of ``backbone.blocks()`` starts at the step of the same name.
- :func:`split_backbone` ``(backbone, block) -> (prefix, suffix)``: the steps before / from
  ``block``; ``suffix(prefix(x))`` equals ``backbone(x)`` (a ``(cls, dist)`` pair for
  distilled DeiT). ``h`` is always one tensor (DenseNet carries the concatenation of the
  dense block's features, CaiT the patch tokens with the class token in front).
- :func:`split_point` ``(backbone, trainable names) -> (block or None, reason)``: where a
  run's frozen prefix ends, or why it has none.
- :func:`flops`: forward FLOPs per image of prefix and suffix (``torch.utils.flop_counter``)
  and the expected speed-up of running the prefix once.

Families (:mod:`~tlbench.models.split_families`): one generic mechanism (``sequential_steps``:
run the backbone's stage slots in order, then pool/flatten like
:class:`~tlbench.models.backbones.NetBackbone`) plus small adapters in ``FAMILIES``: the scratch CNN/MLP, torchvision ResNet/VGG (the generic
mechanism as it is), DenseNet (a split inside a dense block carries the concatenated
features), timm EfficientNet(-Lite) (the head's dropout), timm ViT/DeiT (stem: patch
embedding, class/distillation tokens, position embedding; head: norm, pooling or the two
tokens) and timm CaiT (the class token enters before the class-attention blocks). Any other
torchvision/timm network is tried with the generic mechanism and accepted only if it
reproduces the backbone's output on a probe input (:class:`SplitUnsupported` otherwise).
docs/architecture.md says how a new family is added.
"""

from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .base import Backbone
from .split_families import FAMILIES, Family, Output, Steps, sequential_steps


RTOL = 1e-5  # suffix(prefix(x)) vs backbone(x): max |difference| / max |output|


class SplitUnsupported(Exception):
    """The backbone's forward is not reproduced by any split adapter."""


# ----------------------------------------------------------------------------- program
@dataclass
class Program:
    """The backbone as named steps; ``starts[block]`` is the index of the step a block begins at."""

    family: str
    steps: Steps
    starts: dict[str, int]
    verified: bool  # True: a known family; False: the generic mechanism, checked on a probe

    def index(self, block: str) -> int:
        if block not in self.starts:
            raise ValueError(f"{block!r} is not a block this backbone can be split at; blocks: {', '.join(self.starts)}")
        return self.starts[block]


_CHECKED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # generic programs already checked on a probe


def program(backbone: Backbone) -> Program:
    """The backbone's forward as steps (see the module docstring). Raises :class:`SplitUnsupported`
    when no adapter fits and the generic mechanism does not reproduce the backbone's output."""
    net = getattr(backbone, "net", None)
    for fam in FAMILIES:
        obj = backbone if fam.on == "backbone" else net
        classes = fam.classes()
        if obj is not None and classes and isinstance(obj, classes):
            trusted = type(obj) in classes
            return _finish_program(backbone, fam.name, fam.steps(backbone), trusted)
    if not isinstance(net, nn.Module) or not hasattr(backbone, "block_spec"):
        raise SplitUnsupported(f"split execution does not know {type(backbone).__name__}; "
                               "add an adapter to tlbench.models.split_families.FAMILIES (docs/architecture.md)")
    # torchvision's convention (flatten after avgpool) is harmless elsewhere; the probe decides
    steps = sequential_steps(backbone, after={"avgpool": nn.Flatten(1)})
    return _finish_program(backbone, f"generic ({type(net).__name__})", steps, False)


def _finish_program(backbone: Backbone, family: str, steps: Steps, trusted: bool) -> Program:
    names = [n for n, _ in steps]
    starts = {b: names.index(b) for b in backbone.blocks() if b in names}
    prog = Program(family, steps, starts, trusted)
    if not trusted and backbone not in _CHECKED:
        err = _probe(backbone, prog)
        if err is not None:
            raise SplitUnsupported(
                f"split execution does not support {family}: running its slots in order does not reproduce "
                f"the backbone's forward ({err}); add an adapter to tlbench.models.split_families.FAMILIES "
                "(docs/architecture.md)")
        _CHECKED.add(backbone)
    return prog


def _probe(backbone: Backbone, prog: Program) -> Optional[str]:
    spec = backbone.input_spec
    if not spec.size:
        return "no input size to probe with"
    dev = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, spec.channels, spec.size, spec.size, generator=gen).to(dev)
    whole = SplitPart(prog.steps)
    try:
        with eval_mode(backbone), torch.no_grad():
            err = relative_error(whole(x), backbone(x))
    except Exception as e:  # noqa: BLE001 -- any failure means "not sequential"
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None if err <= RTOL else f"relative difference {err:.2g}"


class SplitPart(nn.Module):
    """A run of steps (the prefix or the suffix). Its submodules are the backbone's own."""

    def __init__(self, steps: Steps):
        super().__init__()
        self.names = [n for n, _ in steps]
        self.steps = nn.ModuleList([m for _, m in steps])

    def forward(self, x):
        for step in self.steps:
            x = step(x)
        return x

    def extra_repr(self) -> str:
        return f"steps: {', '.join(self.names) or '(none)'}"


def split_backbone(backbone: Backbone, block: str) -> tuple[SplitPart, SplitPart]:
    """``(prefix, suffix)`` with the suffix starting at ``block`` (a name of ``backbone.blocks()``);
    ``suffix(prefix(x))`` equals ``backbone(x)``. Both share the backbone's parameters."""
    prog = program(backbone)
    i = prog.index(block)
    return SplitPart(prog.steps[:i]), SplitPart(prog.steps[i:])


# ----------------------------------------------------------------------------- when it applies
def _trainable_ids(backbone: Backbone, names: Optional[Sequence[str]]) -> set[int]:
    params = dict(backbone.named_parameters())
    if names is None:
        return {id(p) for p in params.values() if p.requires_grad}
    out, unknown = set(), []
    for n in names:
        if n.startswith("backbone."):
            n = n[len("backbone."):]
        elif n.startswith(("heads.", "heads_dist.")):
            continue
        key = n if n in params else f"net.{n}"
        if key in params:
            out.add(id(params[key]))
        else:
            unknown.append(n)
    if unknown:
        raise ValueError(f"not parameters of this backbone: {', '.join(unknown[:3])}")
    return out


def _stochastic(backbone: nn.Module, part: nn.Module) -> Optional[str]:
    """A module of ``part`` that is random in training (dropout / drop path with p > 0), if any,
    named as in the backbone."""
    names = {id(m): n for n, m in backbone.named_modules()}
    for name, m in part.named_modules():
        p = getattr(m, "p", None) if isinstance(m, nn.modules.dropout._DropoutNd) else getattr(m, "drop_prob", None)
        if isinstance(p, (int, float)) and p > 0:
            return f"{names.get(id(m), name)} (p={p:g})"
    return None


def split_point(
    backbone: Backbone,
    trainable_param_names: Optional[Sequence[str]] = None,
    *,
    require_suffix: bool = True,
    frozen_bn_eval: bool = True,
) -> tuple[Optional[str], str]:
    """Where the frozen prefix ends: ``(first block of the suffix, reason)``, or ``(None, why not)``.

    ``trainable_param_names``: names relative to the model (``FreezePlan.trainable``: ``backbone.``
    prefixed, heads ignored), the backbone or ``backbone.net``; None: ``requires_grad`` now.
    The split is the block boundary just before the first step that uses a trainable parameter.
    It applies when something before it is frozen, nothing before it is random in training
    (dropout, drop path), its BatchNorm is kept in eval (``frozen_bn_eval``, i.e. ``freeze.bn=eval``)
    and, with ``require_suffix``, the blocks with a trainable parameter are the last ones
    (``last_block``, ``first_n``, an ``index``/``pattern`` choice ending at the last block).
    The run must also feed a fixed function of the image (no random augmentation) and not
    unfreeze gradually; the caller checks those (as :func:`tlbench.features.decide` does).
    """
    try:
        prog = program(backbone)
    except SplitUnsupported as e:
        return None, str(e)
    train = _trainable_ids(backbone, trainable_param_names)
    if not train:
        return None, "no backbone parameter trains: the whole backbone is frozen (its features are cached whole)"
    first_use: dict[int, int] = {}
    for i, (_, m) in enumerate(prog.steps):
        for p in m.parameters():
            first_use.setdefault(id(p), i)
    unrun = [n for n, p in backbone.named_parameters() if id(p) in train and id(p) not in first_use]
    if unrun:
        return None, f"{unrun[0]} trains but no split step uses it"
    k = min(first_use[i] for i in train)
    first = next(n for n, p in backbone.named_parameters() if id(p) in train and first_use[id(p)] == k)
    starts = [i for i in prog.starts.values() if i <= k]
    if not starts:
        return None, f"{first} trains before the first block: nothing before it is frozen"
    b = max(starts)
    block = prog.steps[b][0]
    if next((p for _, m in prog.steps[:b] for p in m.parameters()), None) is None:
        return None, f"{first} trains and nothing before it is frozen (full fine-tuning or the first block)"
    if require_suffix:
        blocks = _block_params(backbone)
        flags = [(n, any(i in train for i in ids)) for n, ids in blocks]
        t = next((j for j, (_, on) in enumerate(flags) if on), None)
        frozen_after = [n for n, on in flags[t + 1 :] if not on] if t is not None else []
        if frozen_after:
            return None, f"{flags[t][0]} trains but {frozen_after[0]} is frozen after it"
    prefix = SplitPart(prog.steps[:b])
    random = _stochastic(backbone, prefix)
    if random:
        return None, f"the frozen prefix is random in training: {random}"
    if not frozen_bn_eval and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in prefix.modules()):
        return None, "frozen BatchNorm trains (freeze.bn=train): the prefix changes every step"
    n_blocks = len(backbone.blocks())
    n_before = sum(1 for i in prog.starts.values() if i < b)
    return block, f"everything before {block} is frozen ({n_before} of {n_blocks} blocks): it can run once"


def _block_params(backbone: Backbone) -> list[tuple[str, set[int]]]:
    """[(block, parameter ids)], each parameter in the first block that holds it (as freeze.py)."""
    seen: set[int] = set()
    out = []
    for name, mod in backbone.blocks().items():
        ids = {id(p) for p in mod.parameters()} - seen
        seen |= ids
        out.append((name, ids))
    return out


# ----------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class SplitFlops:
    """Forward FLOPs per image (``torch.utils.flop_counter``: matmuls, convolutions, attention;
    not elementwise ops) of the frozen prefix and the trainable suffix."""

    prefix: int
    suffix: int

    @property
    def total(self) -> int:
        return self.prefix + self.suffix

    def expected_speedup(self, n_train: int = 1, n_eval: int = 0, backward_factor: float = 2.0) -> float:
        """Per-epoch speed-up of running the prefix once, counting FLOPs only: a training image
        costs ``prefix + (1 + backward_factor) * suffix`` without the split (the frozen prefix
        has no backward) and ``(1 + backward_factor) * suffix`` with it; an evaluated image
        ``prefix + suffix`` vs ``suffix``. The one-off prefix pass and data loading are left out."""
        train_s = (1 + backward_factor) * self.suffix
        before = n_train * (self.prefix + train_s) + n_eval * self.total
        after = n_train * train_s + n_eval * self.suffix
        return float("inf") if after == 0 else before / after


def _count(module: nn.Module, x) -> tuple[int, object]:
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs):  # not in torch's table
        return sdpa_flop_count(q, k, v)

    mapping = {}
    if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = sdpa_cpu
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        out = module(x)
    return int(counter.get_total_flops()), out


def flops(backbone: Backbone, split: str, input_size: Union[int, Sequence[int], None] = None) -> SplitFlops:
    """Forward FLOPs per image of the prefix and the suffix when split at block ``split``.
    ``input_size``: pixels (square), ``(H, W)`` or ``(C, H, W)``; default the backbone's input size."""
    prefix, suffix = split_backbone(backbone, split)
    spec = backbone.input_spec
    if input_size is None:
        if not spec.size:
            raise ValueError("this backbone takes images at their native size: pass input_size")
        input_size = spec.size
    shape = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    shape = shape if len(shape) == 3 else (spec.channels, *shape)
    dev = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    x = torch.zeros(1, *shape, device=dev)
    with eval_mode(backbone), torch.no_grad():
        fp, h = _count(prefix, x)
        fs, _ = _count(suffix, h)
    return SplitFlops(fp, fs)


# ----------------------------------------------------------------------------- helpers
@contextmanager
def eval_mode(module: nn.Module):
    """Eval mode inside, every submodule's own mode restored after (frozen BN stays as it was)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


def relative_error(a: Output, b: Output) -> float:
    """max |a - b| / max |b| over the output (each tensor of a pair)."""
    if isinstance(b, (tuple, list)):
        if not isinstance(a, (tuple, list)) or len(a) != len(b):
            return float("inf")
        return max((relative_error(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (tuple, list)) or a.shape != b.shape:
        return float("inf")
    scale = b.detach().abs().max().clamp_min(torch.finfo(b.dtype).tiny)
    return float((a.detach() - b.detach()).abs().max() / scale)


__all__ = ["FAMILIES", "Family", "Program", "RTOL", "SplitFlops", "SplitPart", "SplitUnsupported", "eval_mode",
           "flops", "program", "relative_error", "sequential_steps", "split_backbone", "split_point"]
