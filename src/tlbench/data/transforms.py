"""Transforms chosen from the model's :class:`InputSpec` and the augmentation preset.

Eval transforms are never random. Grayscale images are expanded to 3 channels when the
model wants RGB (and RGB reduced to 1 channel for a 1-channel model).
"""

from __future__ import annotations

from torchvision import transforms as T

from ..models.base import InputSpec


def build_transforms(spec: InputSpec, augment: str, native_size: int,
                     varying_sizes: bool = False) -> tuple[T.Compose, T.Compose]:
    """Return ``(train_transform, eval_transform)`` mapping a PIL image to a tensor.

    Models that take the native size still get a fixed size when the images' sizes may
    differ (file datasets): the first image's size, so a batch can be stacked.
    """
    size = model_size(spec, native_size)
    base = []
    if (spec.resize and spec.size) or varying_sizes:
        base.append(T.Resize((size, size)))
    tail = [T.ToTensor(), T.Normalize(list(spec.mean[: spec.channels]), list(spec.std[: spec.channels]))]
    aug = []  # flips are decided per (seed, epoch, item) by the sampler: data.SplitDataset(flip=True)
    if augment == "flip_crop":
        aug.append(T.RandomCrop(size, padding=crop_padding(size)))
    if augment == "randaugment":
        aug.append(T.RandAugment())
    eval_tf = T.Compose([_ChannelFix(spec.channels), *base, *tail])
    train_tf = T.Compose([_ChannelFix(spec.channels), *base, *aug, *tail])
    return train_tf, eval_tf


def model_size(spec: InputSpec, native_size: int) -> int:
    """The square size images are fed at: the model's, or the native size for a model that takes it."""
    return spec.size if spec.resize and spec.size else native_size


def crop_padding(size: int) -> int:
    """``augment=flip_crop``: the zero padding of the random crop (both data paths)."""
    return max(1, size // 8)


class _ChannelFix:
    """PIL image -> the mode with the channels the model wants (L -> RGB, RGB -> L)."""

    def __init__(self, channels: int):
        self.mode = "RGB" if channels == 3 else "L"

    def __call__(self, img):
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ChannelFix({self.mode})"
