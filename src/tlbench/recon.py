"""The reconstruction task (``model=cae``): its objective in the one loop, its metrics, its
predictions file and its figures.

What is compared. The loader feeds the model *normalized* images ``x = (img - mean) / std``
(the scratch models' normalization: mean = std = 0.5, so ``x`` is in [-1, 1]); ``img`` is the
image as ``ToTensor`` gives it, in [0, 1]. The decoder's output is a logit per pixel and
channel, and the reconstruction is ``sigmoid(logit)``, in [0, 1]. Both are compared with the
un-normalized image ``target = x * std + mean`` (clamped to [0, 1] against rounding), so
``loss=mse`` is the mean squared error of two [0, 1] images and ``loss=bce`` the binary
cross-entropy of the logits against the [0, 1] intensities (``binary_cross_entropy_with_logits``).

Metrics, per image, on [0, 1] images (``data_range`` = 1), averaged over the images of a split:

- ``mse``: mean over pixels and channels of (reconstruction - target)^2;
- ``psnr``: 10 log10(1 / mse) in dB (mse floored at 1e-10, so at most 100 dB);
- ``ssim``: Wang et al. (2004) structural similarity, Gaussian window (sigma 1.5, 11 px, or the
  largest odd size that fits a smaller image: 7 for 8x8 digits), K1 = 0.01, K2 = 0.03, over
  the window positions that lie inside the image ("valid"), averaged over positions and
  channels. Implemented here (:func:`ssim`, a few lines of ``conv2d``) and tested against a
  direct per-window evaluation of the formula (tests/test_recon.py);
- ``loss``: the training loss of the image (mse, or the mean binary cross-entropy).

``predictions/reconstruction.csv`` (test; ``predictions/val/...`` for val) holds these four
numbers for every image, so every metric in ``results.json`` is the mean of a column.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .config import is_reconstruction
from .devices import constant
from .figures import new_figure
from .models.cae import RECON_TASK
from .tracking import save_figure

METRICS = ("loss", "mse", "psnr", "ssim")
MSE_FLOOR = 1e-10
SSIM_SIGMA, SSIM_SIZE, SSIM_K1, SSIM_K2 = 1.5, 11, 0.01, 0.03
GRID_IMAGES = 8  # images per input-vs-reconstruction grid


# ----------------------------------------------------------------------------- metrics
def _window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(r ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_window_size(h: int, w: int) -> int:
    """11, or the largest odd size that fits an image smaller than that."""
    side = min(SSIM_SIZE, h, w)
    return side if side % 2 else side - 1


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image SSIM of two batches (B, C, H, W) of images in [0, data_range] -> (B,)."""
    c = a.shape[1]
    size = ssim_window_size(*a.shape[-2:])
    win = _window(size, SSIM_SIGMA, a.device, a.dtype).expand(c, 1, size, size)
    filt = lambda t: F.conv2d(t, win, groups=c)  # noqa: E731  (valid positions only)
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of [0, 1] images from their MSE (floored at 1e-10: at most 100 dB)."""
    return 10 * torch.log10(1.0 / mse.clamp_min(MSE_FLOOR))


def summarize(items: dict[str, np.ndarray]) -> dict:
    """``results.json``'s metrics of a split: the mean of each per-image column, and ``n``."""
    n = len(items["mse"])
    return {"n": int(n), **{k: float(np.mean(np.asarray(items[k], dtype=np.float64))) if n else math.nan
                            for k in METRICS}}


# ----------------------------------------------------------------------------- the objective
class Reconstruction:
    """The loop's objective for ``model=cae`` (see the module docstring for what is compared)."""

    scores = False  # no accuracy: the epoch's numbers are its loss; per-image metrics are collected

    def __init__(self, loss: str, mean, std):
        self.loss = "mse" if loss == "auto" else loss
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(v) for v in std)

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The [0, 1] image a normalized batch came from."""
        shape = (1, x.shape[1], 1, 1)
        mean = constant(self.mean[: x.shape[1]], x.device, shape)
        std = constant(self.std[: x.shape[1]], x.device, shape)
        return (x.float() * std + mean).clamp(0.0, 1.0)

    def image_losses(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each image (B,)."""
        if self.loss == "bce":
            per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            per_pixel = (torch.sigmoid(logits) - target) ** 2
        return per_pixel.flatten(1).mean(1)

    def losses(self, out: dict, x: torch.Tensor, y: dict) -> dict:
        return {RECON_TASK: self.image_losses(out[RECON_TASK].float(), self.target(x)).mean()}

    def measure(self, out: dict, x: torch.Tensor, y: dict, collect: bool):
        if not collect:
            return {}, None
        logits, target = out[RECON_TASK].detach().float(), self.target(x)
        recon = torch.sigmoid(logits)
        mse = ((recon - target) ** 2).flatten(1).mean(1)
        items = {"loss": self.image_losses(logits, target), "mse": mse, "psnr": psnr(mse),
                 "ssim": ssim(recon, target)}
        return {}, {RECON_TASK: items}

    def reconstruct(self, model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input image, reconstruction), both [0, 1], of a normalized batch (eval, no grad)."""
        was = model.training
        model.eval()
        with torch.inference_mode():
            recon = torch.sigmoid(model(x)[RECON_TASK].float())
        model.train(was)
        return self.target(x), recon


def objective(cfg, spec) -> Optional[Reconstruction]:
    """The run's objective: a :class:`Reconstruction` for ``model=cae``; None (the loop's
    default, classification) otherwise."""
    return Reconstruction(cfg.loss, spec.mean, spec.std) if is_reconstruction(cfg) else None


# ----------------------------------------------------------------------------- outputs
def write_errors(path: Path, indices, items: dict, relpaths=None) -> None:
    """``index[,path],loss,mse,psnr,ssim``: one row per image (the split's order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", *(["path"] if relpaths is not None else []), *METRICS])
        for i, idx in enumerate(indices):
            row = [int(idx), *([relpaths[int(idx)]] if relpaths is not None else [])]
            w.writerow(row + [repr(float(items[k][i])) for k in METRICS])


def first_images(dataset, n: int = GRID_IMAGES) -> torch.Tensor:
    """The first ``n`` items of a split as one normalized batch (without moving the run's RNG)."""
    with torch.random.fork_rng():
        return torch.stack([dataset[i][0] for i in range(min(n, len(dataset)))]).float()


def grid(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """One image: the inputs in the top row, their reconstructions below (C, H, W in [0, 1])."""
    import torchvision

    both = torch.cat([target.cpu(), recon.cpu()])
    return torchvision.utils.make_grid(both, nrow=len(target), padding=1, pad_value=1.0)


def grid_figure(img: torch.Tensor, title: str):
    arr = img.permute(1, 2, 0).numpy()
    h, w = arr.shape[:2]
    fig = new_figure((max(4.0, 8.0 * w / max(h, 1) / 4), 4.0))
    ax = fig.add_subplot()
    ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0.0, vmax=1.0)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def report_split(run_dir: Path, split: str, collected: dict, bundle, tracker, prefix: str = "",
                 model=None, objective_=None, shown: Optional[str] = None) -> dict:
    """``predictions/[val/]reconstruction.csv`` and ``{task: metrics}`` of one split; for the test
    split also ``figures/reconstructions.png`` (inputs above their reconstructions, the model as
    loaded: the best checkpoint) and the same grid in TensorBoard."""
    items = collected[RECON_TASK]
    dataset = getattr(bundle, split)
    indices = dataset.indices[: len(items["mse"])]
    sub = "" if split == "test" else f"{split}/"
    write_errors(run_dir / f"{prefix}predictions" / f"{sub}{RECON_TASK}.csv", indices, items, bundle.source.relpaths)
    if split == "test" and model is not None and objective_ is not None and len(dataset):
        save_grid(run_dir, model, objective_, dataset, tracker, prefix, shown or split)
    return {RECON_TASK: summarize(items)}


def save_grid(run_dir: Path, model, objective_: Reconstruction, dataset, tracker, prefix: str = "",
              split: str = "test") -> Path:
    device = next(model.parameters()).device
    target, recon = objective_.reconstruct(model, first_images(dataset).to(device))
    img = grid(target, recon)
    fig = grid_figure(img, f"{split}: inputs (top) and reconstructions (bottom), best checkpoint")
    path = save_figure(fig, run_dir / "figures" / f"{prefix}reconstructions.png")
    if tracker:
        tracker.image("reconstruction/best", img, 0)
    return path


def extend_hooks(hooks, objective_: Optional[Reconstruction], model, val_set, tracker):
    """A reconstruction run's ``FitHooks``: after each epoch's record, the first validation images
    and their reconstructions by the current model go to TensorBoard (``reconstruction/val``).
    Classification runs: ``hooks`` unchanged."""
    if objective_ is None or not len(val_set):
        return hooks
    batch, log_epoch = first_images(val_set), hooks.log_epoch

    def log(state, rec: dict) -> None:
        log_epoch(state, rec)
        device = next(model.parameters()).device
        tracker.image("reconstruction/val", grid(*objective_.reconstruct(model, batch.to(device))), rec["epoch"])

    hooks.log_epoch = log
    return hooks
