"""The CUDA switches (issue #13): which speed features a run uses on which device, decided once
from the config and the device (:func:`decide`), applied (:func:`apply`, :func:`compiled`) and
recorded in ``results.json`` under ``"speed"``. Every switch is a config key whose ``auto``
default is on where it helps and cannot change what is computed beyond float rounding:

| key | ``auto`` |
|---|---|
| ``trainer.precision`` (default ``32``; ``auto`` = ``bf16-mixed`` where the GPU has bf16) | autocast; a GradScaler only for ``16-mixed`` (float16), never for bf16 |
| ``trainer.channels_last`` | on CUDA for conv nets (more than one Conv2d: a ViT's patch embedding alone is not one) |
| ``trainer.compile`` | on CUDA: ``torch.compile`` of what the batches run through (suffix + heads with the frozen-prefix cache, else the model); off, with ``compile_error``, where :func:`compile_probe` finds no working compiler |
| ``optim.impl`` | ``fused`` on CUDA (Adam, AdamW, SGD), torch's default elsewhere (``optim.optimizer_impl``) |
| ``trainer.cudnn_benchmark``, ``trainer.tf32`` | on CUDA when ``trainer.deterministic=false`` |

Evaluation runs under ``torch.inference_mode`` (``engine.run_epoch``), and so does the frozen
prefix's one pass (``features._prefix_pass``); a frozen prefix run every step (no cache) has no
parameter that requires grad, so autograd records nothing there either.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import Config
from .engine import amp_dtype
from .optim import optimizer_impl

log = logging.getLogger(__name__)

DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Speed:
    device: str
    precision: str  # as resolved: 32 | 16-mixed | bf16-mixed
    autocast: Optional[str]  # float16 | bfloat16 | None
    grad_scaler: bool
    channels_last: bool
    compile: bool
    optimizer: str  # fused | foreach | loop | default (optim.optimizer_impl)
    cudnn_benchmark: bool
    tf32: bool
    compile_error: Optional[str] = None  # why compile was asked for and is off (compile_probe failed)

    @property
    def dtype(self) -> Optional[torch.dtype]:
        return {v: k for k, v in DTYPE_NAMES.items()}.get(self.autocast)

    def record(self, frozen_prefix_cached: bool = False) -> dict:
        return {**dataclasses.asdict(self),
                "inference_mode": {"eval": True, "frozen_prefix_pass": frozen_prefix_cached}}


def switch(value: str, auto: bool) -> bool:
    """An ``auto|true|false`` setting -> on or off."""
    return auto if str(value).lower() == "auto" else str(value).lower() == "true"


def bf16_supported() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16-mixed" if device.type == "cuda" and bf16_supported() else "32"


def is_conv_net(model: nn.Module) -> bool:
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def decide(cfg: Config, device: torch.device, model: nn.Module) -> Speed:
    t, cuda = cfg.trainer, device.type == "cuda"
    fast = cuda and not t.deterministic  # timing-based algorithm choice and TF32: not when asked for determinism
    precision = resolve_precision(t.precision, device)
    dtype = amp_dtype(device, precision)
    return Speed(device=str(device), precision=precision if dtype else "32", autocast=DTYPE_NAMES.get(dtype),
                 grad_scaler=dtype is torch.float16, channels_last=switch(t.channels_last, cuda and is_conv_net(model)),
                 compile=switch(t.compile, cuda), optimizer=optimizer_impl(cfg.optim.impl, device),
                 cudnn_benchmark=switch(t.cudnn_benchmark, fast), tf32=switch(t.tf32, fast))


def apply(speed: Speed, model: nn.Module) -> None:
    """The model's memory format; on CUDA the process-wide cuDNN and TF32 flags."""
    if speed.channels_last:
        model.to(memory_format=torch.channels_last)
    if not speed.device.startswith("cuda"):
        return  # never touch process-wide backend flags where they do nothing
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    set_tf32(speed.tf32)


def set_tf32(on: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions. Through the ``allow_tf32`` flags: torch 2.9+
    maps them onto the ``fp32_precision`` settings and keeps both views readable, while setting
    ``fp32_precision`` directly makes the legacy getters (read by Inductor's autotuning and other
    libraries) raise "mix of the legacy and new APIs"."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


_PROBED: dict[str, Optional[str]] = {}  # device type -> why compile does not work there (None: it works)


def compile_probe(device: torch.device) -> Optional[str]:
    """Whether ``torch.compile`` works on ``device`` at all: a tiny model compiled, run forward and
    backward (once per process and device type). None when it works, else the error's first line.

    TorchDynamo's ``suppress_errors`` (below) runs a forward graph that fails to compile eagerly,
    but the backward graph is compiled lazily inside ``loss.backward()``, outside that net: a
    machine without a working Triton or C++ compiler would end the run at its first step. The
    probe turns that into a warning and an eager run, recorded as ``speed.compile_error``."""
    from torch import _dynamo as dynamo

    if device.type not in _PROBED:
        before = dynamo.config.suppress_errors
        dynamo.config.suppress_errors = False  # a failure must show here, not be run eagerly
        try:
            lin = nn.Linear(4, 3).to(device)
            torch.compile(lin)(torch.randn(5, 4, device=device)).sin().sum().backward()
            _PROBED[device.type] = None
        except Exception as e:  # noqa: BLE001 -- any failure means "compile does not work here"
            _PROBED[device.type] = _first_line(e)
        finally:
            dynamo.config.suppress_errors = before
            dynamo.reset()
    return _PROBED[device.type]


def _first_line(e: BaseException) -> str:
    """The innermost cause of a compile error, on one line (a backend failure wraps the error)."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def compiled(net: nn.Module, speed: Speed) -> tuple[nn.Module, Speed]:
    """What the batches run through, and the switches as they end up: ``torch.compile(net)`` when
    the switch is on and :func:`compile_probe` passes (it shares the parameters: checkpoints
    still save the uncompiled model); else ``net`` itself, with ``compile=False`` and the probe's
    error. A graph of ``net`` that fails to compile runs eagerly instead of ending the run:
    TorchDynamo's ``suppress_errors`` logs the failure and falls back."""
    if not speed.compile:
        return net, speed
    why = compile_probe(torch.device(speed.device))
    if why is not None:
        log.warning("trainer.compile: torch.compile does not work on %s here (%s); running eagerly "
                    "(results.json speed.compile_error; trainer.compile=false silences this)", speed.device, why)
        return net, dataclasses.replace(speed, compile=False, compile_error=why)
    from torch import _dynamo as dynamo

    dynamo.config.suppress_errors = True
    return torch.compile(net), speed
