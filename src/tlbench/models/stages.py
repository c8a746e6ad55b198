"""Finding the named stages (blocks) of a wrapped network, and cutting it after one.

A block is a group of consecutive "slots" (child modules, in forward order) and is named
after the dotted path of its first slot, relative to the wrapped network. Slots are found by
starting from the network's children and repeatedly expanding the one container that holds
most (>= 80 %) of the parameters (VGG ``features``, DenseNet ``features``, timm ``blocks``,
torchvision ViT ``encoder.layers``) into its own children. A new block starts at every slot
with parameters, except normalization layers, which join the block before them (VGG-BN's
``features.41`` belongs to block ``features.40``; a ViT's final ``norm`` to its last block);
parameter-free slots (ReLU, pooling, a removed classifier) also join the block before them.
"""

from __future__ import annotations

from torch import nn

Spec = list[tuple[str, list[str]]]  # [(block name, [member module paths])]

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
_DOMINANT = 0.8


def n_params(m: nn.Module | None) -> int:
    return 0 if m is None else sum(p.numel() for p in m.parameters())


def _expandable(m: nn.Module) -> bool:
    return sum(1 for c in m.children() if n_params(c) > 0) >= 2


def find_slots(net: nn.Module, skip: tuple[str, ...] = (), expand: tuple[str, ...] = ()) -> list[str]:
    """Module paths of the trunk in forward order (see the module docstring).

    ``skip``: top-level children left out of the dominance test (a kept classifier part).
    ``expand``: paths always expanded into their children when present.
    """
    slots = [(n, m) for n, m in net.named_children() if m is not None]
    core = sum(n_params(m) for n, m in slots if n not in skip) or 1
    changed = True
    while changed:
        changed = False
        for i, (name, mod) in enumerate(slots):
            dominant = name not in skip and n_params(mod) >= _DOMINANT * core and _expandable(mod)
            if dominant or name in expand:
                kids = [(f"{name}.{k}", c) for k, c in mod.named_children() if c is not None]
                if kids:
                    slots[i : i + 1] = kids
                    changed = True
                    break
    return [n for n, _ in slots]


def group_slots(net: nn.Module, slots: list[str]) -> Spec:
    """Group slots into blocks: a block starts at each slot with parameters that is not a norm."""
    spec: Spec = []
    pending: list[str] = []  # parameter-free slots before the first block
    for path in slots:
        mod = net.get_submodule(path)
        starts = n_params(mod) > 0 and not (isinstance(mod, _NORMS) and spec)
        if starts:
            spec.append((path, pending + [path]))
            pending = []
        elif spec:
            spec[-1][1].append(path)
        else:
            pending.append(path)
    return spec


def matcher_spec(groups: dict[int, list[str]]) -> Spec:
    """Blocks from timm's ``group_matcher`` (``timm.models.group_modules``: group id -> the
    modules holding parameters, ids in forward order). Each group becomes one block of the
    smallest set of module paths that covers it (a module joins when every module with
    parameters under it is in the group), named after its first path as every block is (CoaT's
    ``patch_embed2`` holds ``patch_embed2``, ``cpe2`` and ``crpe2``). Used for ``model=timm`` archs,
    whose registration order can differ from the forward order (CoaT registers every patch
    embedding before any block)."""
    owner = {name: gid for gid, names in groups.items() for name in names}
    under: dict[str, set[int]] = {}  # module path -> the groups of the parameter-holding modules under it
    for name, gid in owner.items():
        parts = name.split(".") if name else []
        for k in range(1, len(parts) + 1):
            under.setdefault(".".join(parts[:k]), set()).add(gid)
    spec: Spec = []
    for gid in sorted(groups):
        cover: list[str] = []
        for name in groups[gid]:
            if not name:
                continue  # parameters held by the network itself (tokens, embeddings) stay outside blocks
            parts = name.split(".")
            top = next((".".join(parts[:k]) for k in range(1, len(parts) + 1) if under[".".join(parts[:k])] == {gid}),
                       name)  # a module whose children belong to other groups: itself
            if top not in cover:
                cover.append(top)
        if cover:
            spec.append((cover[0], cover))
    return spec


def block_module(net: nn.Module, paths: list[str]) -> nn.Module:
    """The block as one module: the module itself, or an (unregistered) ModuleList of its members."""
    mods = [net.get_submodule(p) for p in paths]
    return mods[0] if len(mods) == 1 else nn.ModuleList(mods)


def _remove(net: nn.Module, path: str) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = net.get_submodule(parent_path) if parent_path else net
    if isinstance(parent, nn.ModuleList):
        del parent[int(child)]
    elif isinstance(parent, nn.ModuleDict):
        del parent[child]  # e.g. DenseNet's _DenseBlock iterates its items
    else:
        setattr(parent, child, nn.Identity())


def truncate(net: nn.Module, spec: Spec, name: str, keep_prefix: str | None = None) -> Spec:
    """Cut ``net`` after block ``name``: every later slot except parameter-free top-level ones
    (pooling, flatten) is replaced by Identity (or deleted from a ModuleList/ModuleDict).
    Blocks whose name starts with ``keep_prefix`` survive a cut before them (CaiT's
    class-attention blocks, which pool the tokens). Returns the kept spec.
    """
    names = [n for n, _ in spec]
    k = names.index(name)
    survives = keep_prefix is not None and not name.startswith(keep_prefix)
    keep = [(n, p) for n, p in spec[k + 1 :] if survives and n.startswith(keep_prefix)]
    drop = [p for n, paths in spec[k + 1 :] if (n, paths) not in keep for p in paths]
    # parameter-free top-level modules (global pool, flatten, removed classifier) always stay
    drop = [p for p in drop if "." in p or n_params(net.get_submodule(p)) > 0]
    for path in reversed(drop):  # from the end, so ModuleList indices stay valid
        _remove(net, path)
    return spec[: k + 1] + keep
