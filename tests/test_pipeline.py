"""The tensor data path (``dataset.pipeline``, issue #13): the same batches as the DataLoader path
(images within one grey level of the resize, the same labels, the same flips per (seed, epoch)),
decoded file datasets cached on disk, DDP sharding, the choice between the paths."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import results
from tlbench import dist
from tlbench.config import Config, DatasetConfig, TrainerConfig, to_dict
from tlbench.validation import to_config
from tlbench.data import ImageSplit, TensorSplit, build_data
from tlbench.data.base import Source
from tlbench.data.loaders import make_loaders
from tlbench.errors import TlbenchError
from tlbench.models.base import InputSpec
from tlbench.store import FeatureStore

CPU = torch.device("cpu")
SPEC = InputSpec(size=48, channels=3)  # resized from 32 (arrays) / from any size (files)


def noise_source(n=40, shape=(32, 32, 3), seed=0) -> Source:
    rng = np.random.default_rng(seed)
    return Source(tasks={"label": list("abcd")}, labels={"label": np.arange(n) % 4},
                  images=rng.integers(0, 256, (n, *shape), dtype=np.uint8), default_task="label")


def noise_files(root: Path, per_class=8) -> None:
    """ImageFolder of noise images (flips and resizes are visible) in mixed modes and sizes."""
    modes = ("RGB", "L", "RGBA", "P")
    for c in range(3):
        for k in range(per_class):
            size = (30 + 7 * k, 20 + 5 * ((k + c) % 4))
            im = Image.effect_noise(size, 80).convert("RGB")
            mode = modes[k % len(modes)]
            im = im.convert(mode) if mode != "P" else im.convert("P", palette=Image.Palette.ADAPTIVE)
            (root / f"class{c}").mkdir(parents=True, exist_ok=True)
            im.save(root / f"class{c}" / f"img_{k}.png")


def _bundle(monkeypatch, source, pipeline, augment="flip", spec=SPEC, store=None, **kw):
    if source is not None:
        monkeypatch.setattr("tlbench.data.load_source", lambda cfg: source)
    d = DatasetConfig(pipeline=pipeline, augment=augment, val_fraction=0.2, test_fraction=0.2, **kw)
    return build_data(d, spec, store)


def _loaders(bundle, batch=8, seed=3):
    cfg = Config(trainer=TrainerConfig(batch_size=batch), seed=seed)
    return make_loaders(bundle, cfg, CPU)


def _batches(loaders, split, epoch):
    if split == "train":
        loaders[split].sampler.set_epoch(epoch)
    return list(loaders[split])


def assert_same_batches(a, b, spec=SPEC, levels=1.0):
    """Same labels exactly; images within ``levels`` grey levels (0..255) after un-normalizing."""
    assert len(a) == len(b) > 0
    std = torch.tensor(spec.std[: spec.channels]).view(1, -1, 1, 1)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.shape == xb.shape and xa.dtype == xb.dtype == torch.float32
        assert {t: v.tolist() for t, v in ya.items()} == {t: v.tolist() for t, v in yb.items()}
        diff = ((xa - xb).abs() * std * 255).max().item()
        assert diff <= levels + 1e-3, diff


@pytest.mark.parametrize("shape,size", [((32, 32, 3), 48), ((32, 32, 3), 20), ((28, 28), 48)],
                         ids=["rgb-up", "rgb-down", "gray->3"])
def test_array_dataset_same_batches_both_ways(monkeypatch, shape, size):
    """Resized per batch (bilinear, antialias) vs PIL per item: within one grey level."""
    src, spec = noise_source(shape=shape), InputSpec(size=size, channels=3)
    tensor, loader = (_bundle(monkeypatch, src, p, spec=spec) for p in ("tensor", "loader"))
    assert isinstance(tensor.train, ImageSplit) and tensor.pipeline["mode"] == "tensor"
    assert tensor.pipeline["storage_size"] == shape[0]  # native size, resized per batch
    assert loader.pipeline["mode"] == "loader"
    lt, ll = _loaders(tensor), _loaders(loader)
    for epoch in (0, 1):
        assert_same_batches(_batches(lt, "train", epoch), _batches(ll, "train", epoch), spec)
    for split in ("val", "test"):
        assert_same_batches(_batches(lt, split, 0), _batches(ll, split, 0), spec)


def test_flips_follow_the_sampler_per_seed_and_epoch(monkeypatch):
    """The train batches of epoch 0 and 1 differ only by the sampler's order and flips: a flip
    decision that moved (or vanished) fails the comparison with the loader path above; here the
    flipped items are exactly those of ``flip_mask``."""
    from tlbench.data.loaders import flip_mask

    src = noise_source(n=24)
    b = _bundle(monkeypatch, src, "tensor", spec=InputSpec(size=32, channels=3))
    train = b.train
    requests = [(i, bool(f)) for i, f in enumerate(flip_mask(3, 1, len(train)).tolist())]
    x, _ = train[requests]
    plain, _ = train[list(range(len(train)))]
    flipped = torch.tensor([f for _, f in requests])
    assert 0 < int(flipped.sum()) < len(train)
    assert torch.equal(x[flipped], plain[flipped].flip(-1)) and torch.equal(x[~flipped], plain[~flipped])


def test_file_dataset_same_images_both_ways_and_decoded_once(monkeypatch, tmp_path):
    noise_files(tmp_path / "data")
    store = FeatureStore(tmp_path / "store")
    kw = dict(name="image_folder", root=str(tmp_path / "data"))
    tensor = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    loader = _bundle(monkeypatch, None, "loader", **kw)
    assert tensor.pipeline["storage_size"] == SPEC.size and tensor.pipeline["reused"] is False
    lt, ll = _loaders(tensor), _loaders(loader)
    for epoch in (0, 1):  # the loader path's own Resize at decode time: the same pixels
        assert_same_batches(_batches(lt, "train", epoch), _batches(ll, "train", epoch), levels=0)
    assert_same_batches(_batches(lt, "test", 0), _batches(ll, "test", 0), levels=0)
    again = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    assert again.pipeline["reused"] is True and again.pipeline["store_key"] == tensor.pipeline["store_key"]
    assert torch.equal(again.train.x, tensor.train.x)


def test_damaged_or_outdated_decoded_images_are_rebuilt(monkeypatch, tmp_path):
    noise_files(tmp_path / "data", per_class=6)
    store = FeatureStore(tmp_path / "store")
    kw = dict(name="image_folder", root=str(tmp_path / "data"))
    first = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    entry = store.entry(first.pipeline["store_key"]) / "features.npy"
    data = bytearray(entry.read_bytes())
    data[-10] ^= 0xFF  # same size, other bytes: the sha256 check finds it
    entry.write_bytes(bytes(data))
    rebuilt = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    assert rebuilt.pipeline["reused"] is False and torch.equal(rebuilt.train.x, first.train.x)
    img = next((tmp_path / "data" / "class0").iterdir())
    Image.effect_noise((33, 21), 80).convert("RGB").save(img)  # a file changed: another entry
    os.utime(img, ns=(1, 1))
    changed = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    assert changed.pipeline["reused"] is False and changed.pipeline["store_key"] != first.pipeline["store_key"]


def test_crops_are_padded_shifts_of_the_image(monkeypatch):
    """``augment=flip_crop``: each tensor-path image is its uncropped self shifted by at most the
    padding, zeros (the normalized 0) coming in: the loader path's RandomCrop(size, padding)."""
    b = _bundle(monkeypatch, noise_source(n=40), "tensor", augment="flip_crop", spec=InputSpec(size=32, channels=3))
    torch.manual_seed(0)
    x, _ = b.train[list(range(16))]
    plain, _ = b.val.variant(x=b.train.x, labels=b.train.labels)[list(range(16))]  # no crop
    pad = 4
    zero = ((0 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)).view(3, 1, 1)
    for k in range(16):
        padded = torch.nn.functional.pad(plain[k] - zero, (pad,) * 4) + zero
        hits = [(i, j) for i in range(2 * pad + 1) for j in range(2 * pad + 1)
                if torch.allclose(padded[:, i:i + 32, j:j + 32], x[k], atol=1e-5)]
        assert hits, k
    assert not torch.allclose(x, plain)


def test_ddp_ranks_take_their_part_of_every_global_batch(monkeypatch):
    """Per-rank sharding applies to the tensor path: the ranks' batches, concatenated, are the
    single process's global batches; eval shards are strided."""
    b = _bundle(monkeypatch, noise_source(n=40), "tensor", spec=InputSpec(size=32, channels=3))
    whole = _batches(_loaders(b, batch=8), "train", 1)
    parts = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "_WORLD", dist.World(rank=rank, size=2))
        parts.append(_batches(_loaders(b, batch=8), "train", 1))
    monkeypatch.setattr(dist, "_WORLD", dist.World())
    assert len(parts[0]) == len(parts[1]) == len(whole)
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0["label"], y1["label"]]), y["label"])


def test_auto_takes_the_tensor_path_when_it_fits_the_budget(monkeypatch):
    src = noise_source(n=40)  # 40 * 3 * 32 * 32 bytes
    assert _bundle(monkeypatch, src, "auto").pipeline["mode"] == "tensor"
    small = _bundle(monkeypatch, src, "auto", tensor_budget_gb=1e-6)
    assert small.pipeline["mode"] == "loader" and "tensor_budget_gb" in small.pipeline["reason"]
    assert not isinstance(small.train, TensorSplit)  # per-item loader path for the flipped train split
    ra = _bundle(monkeypatch, src, "auto", augment="randaugment")
    assert ra.pipeline["mode"] == "loader" and "randaugment" in ra.pipeline["reason"]
    with pytest.raises(TlbenchError, match="dataset.pipeline=tensor cannot apply: dataset.augment=randaugment"):
        _bundle(monkeypatch, src, "tensor", augment="randaugment")


def test_bad_pipeline_settings_name_the_valid_values():
    base = to_dict(Config())
    with pytest.raises(TlbenchError, match=r"dataset.pipeline='gpu' is not valid; choose one of .*tensor"):
        to_config({**base, "dataset": {**base["dataset"], "pipeline": "gpu"}})
    with pytest.raises(TlbenchError, match="dataset.tensor_budget_gb"):
        to_config({**base, "dataset": {**base["dataset"], "tensor_budget_gb": -1.0}})


def test_a_tiny_run_gives_the_same_metrics_both_ways(cli, tmp_path):
    """Digits resized 8 -> 16 px with flips: the whole run, both paths, within tolerance."""
    args = ("trainer.max_epochs=2", "model.image_size=16", "dataset.augment=flip", "trainer.num_threads=1")
    out = {}
    for p in ("tensor", "loader"):
        code, rd = cli(*args, f"dataset.pipeline={p}", run_dir=tmp_path / p)
        assert code == 0
        out[p] = results(rd)
        assert out[p]["speed"]["pipeline"]["mode"] == p
    t, lo = out["tensor"], out["loader"]
    for e_t, e_l in zip(t["epochs"], lo["epochs"]):
        assert e_t["train"]["loss"] == pytest.approx(e_l["train"]["loss"], rel=2e-3)
        assert e_t["val"]["loss"] == pytest.approx(e_l["val"]["loss"], rel=2e-3)
    assert t["test"]["label"]["accuracy"] == pytest.approx(lo["test"]["label"]["accuracy"], abs=0.01)
    assert t["config_hash"] == lo["config_hash"]  # the path is how, not what (a resume may switch)


def test_decoding_files_shows_a_bar_on_a_terminal(monkeypatch, tmp_path, capsys):
    """The tensor path's one-off decode of a file dataset is not silent on a terminal (#16)."""
    import sys

    from tlbench import progress

    noise_files(tmp_path / "data", per_class=8)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress.configure(console=True, config=True)
    _bundle(monkeypatch, None, "tensor", name="image_folder", root=str(tmp_path / "data"))
    err = capsys.readouterr().err.replace("\r", "\n")
    assert re.search(r"decoding 24 images: +\d+%\|.*\| \d+/24 ", err), err


def test_every_training_fraction_shares_one_decoded_entry(monkeypatch, tmp_path):
    """The tensor path decodes the splits as they are before dataset.train_fraction, so every
    point of a label-efficiency curve reuses one decoded entry; the training split still holds
    only the kept items."""
    noise_files(tmp_path / "data")
    store = FeatureStore(tmp_path / "store")
    kw = dict(name="image_folder", root=str(tmp_path / "data"))
    full = _bundle(monkeypatch, None, "tensor", store=store, **kw)
    half = _bundle(monkeypatch, None, "tensor", store=store, train_fraction=0.5, **kw)
    assert full.pipeline["reused"] is False and half.pipeline["reused"] is True
    assert half.pipeline["store_key"] == full.pipeline["store_key"]
    assert len(half.train) < len(full.train) and half.splits["test"] == full.splits["test"]
    kept = {i: k for k, i in enumerate(full.splits["train"])}
    for j, i in enumerate(half.splits["train"]):  # the kept items' pixels are the full split's
        assert torch.equal(half.train.x[j], full.train.x[kept[i]])


def test_splits_on_the_gpu_are_sliced_without_workers_or_pinning(monkeypatch, caplog):
    """A split that moved to the GPU: dataset.num_workers / pin_memory are for host splits (a
    forked worker cannot use CUDA tensors, and a CUDA tensor cannot be pinned); asked for anyway,
    the loaders slice the split in the main process and say so."""
    from types import SimpleNamespace

    class OnGpu(TensorSplit):
        moved = []

        def to(self, device):
            OnGpu.moved.append(str(device))
            return self

    split = lambda n: OnGpu(torch.zeros(n, 3, 4, 4), {"label": torch.arange(n) % 2}, range(n))  # noqa: E731
    bundle = SimpleNamespace(train=split(16), val=split(8), test=split(8))
    cfg = Config(trainer=TrainerConfig(batch_size=4), dataset=DatasetConfig(num_workers=2, pin_memory=True))
    with caplog.at_level("INFO"):
        loaders = make_loaders(bundle, cfg, torch.device("cuda"))
    assert OnGpu.moved == ["cuda"] * 3
    assert all(dl.num_workers == 0 and not dl.pin_memory for dl in loaders.values())
    assert "without loader workers or pinning" in caplog.text
