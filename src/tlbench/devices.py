"""Small host tensors on the training device without a host-device sync (issue #13: the loop
never waits for the GPU per step).

A copy from pageable host memory to CUDA (``torch.as_tensor(list, device="cuda")``,
``t.to("cuda")``) waits for every kernel queued before it, so a batch's indices, flip decisions
or crop offsets made on the host would stall the GPU queue at every step. ``to_device`` copies
through pinned memory without blocking (the caching host allocator keeps the pinned buffer
alive until the copy is done); ``constant`` keeps per-device constants (normalization
mean/std) made once. On the CPU both are plain tensors.
"""

from __future__ import annotations

import torch

_CONSTANTS: dict = {}


def to_device(values, device: torch.device) -> torch.Tensor:
    """``values`` (a list or a host tensor) as a tensor on ``device``, without a sync on CUDA."""
    t = torch.as_tensor(values)
    if t.device.type == device.type and device.index in (None, t.device.index):
        return t  # there already ("cuda" means the current device: any index will do)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def constant(values: tuple, device: torch.device, shape: tuple = (-1,)) -> torch.Tensor:
    """A float32 constant on ``device``, made once per (values, device, shape)."""
    key = (tuple(values), str(device), tuple(shape))
    if key not in _CONSTANTS:
        _CONSTANTS[key] = to_device(torch.tensor(values, dtype=torch.float32).view(shape), device)
    return _CONSTANTS[key]
