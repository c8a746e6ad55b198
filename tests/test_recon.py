"""The reconstruction task (model=cae): a run in the one loop writes finite MSE/PSNR/SSIM that are
recomputable from predictions/, a figure and per-epoch TensorBoard grids; SSIM against a direct
evaluation of its formula; the task's config checks; resume, eval and compare on cae runs."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from conftest import compose_cfg, results

CAE = ("model=cae", "trainer.max_epochs=2", "trainer.batch_size=128")


@pytest.fixture(scope="module")
def cae_run(tmp_path_factory):
    from tlbench.run import train

    run_dir = tmp_path_factory.mktemp("cae") / "run"
    train(compose_cfg(*CAE, "trainer.progress=false"), run_dir)
    return run_dir


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("split, path", [("test", "predictions/reconstruction.csv"),
                                         ("val", "predictions/val/reconstruction.csv")])
def test_metrics_are_finite_and_recomputable_from_predictions(cae_run, split, path):
    m = results(cae_run)[split]["reconstruction"]
    rows = _rows(cae_run / path)
    assert len(rows) == m["n"] > 0
    for key in ("loss", "mse", "psnr", "ssim"):
        column = np.array([float(r[key]) for r in rows])
        assert math.isfinite(m[key])
        assert m[key] == pytest.approx(float(np.mean(column)), rel=1e-9), key
    mse = np.array([float(r["mse"]) for r in rows])
    psnr = np.array([float(r["psnr"]) for r in rows])
    np.testing.assert_allclose(psnr, 10 * np.log10(1 / mse), rtol=1e-5)  # PSNR of [0, 1] images
    assert 0 < m["mse"] < 0.25 and 0 < m["ssim"] <= 1
    assert [int(r["index"]) for r in rows] == __import__("json").loads((cae_run / "splits.json").read_text())[split]


def test_predictions_mse_is_the_model_output_against_the_unnormalized_image(cae_run):
    """Recompute the first test image's MSE from the best checkpoint: sigmoid(decoder) vs x*0.5+0.5."""
    from tlbench.build import build_everything
    from tlbench.checkpoint import load

    ckpt = load(cae_run / "checkpoints" / "best.pt")
    cfg = compose_cfg(*CAE)
    bundle, model, _ = build_everything(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    x = bundle.test[0][0][None]
    with torch.no_grad():
        recon = torch.sigmoid(model(x)["reconstruction"])
    target = x * 0.5 + 0.5
    assert recon.shape == x.shape and 0 <= float(target.min()) and float(target.max()) <= 1
    first = _rows(cae_run / "predictions" / "reconstruction.csv")[0]
    assert float(first["mse"]) == pytest.approx(float(((recon - target) ** 2).mean()), rel=1e-5)


def test_figure_and_tensorboard_grids(cae_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (cae_run / "figures" / "reconstructions.png").stat().st_size > 1000
    acc = EventAccumulator(str(cae_run / "tb"), size_guidance={"images": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("reconstruction/val")] == [1, 2]  # one grid per epoch
    assert acc.Images("reconstruction/best")
    assert "loss/val" in acc.Tags()["scalars"]
    r = results(cae_run)
    assert r["tasks"] == {"reconstruction": []} and r["monitor"] == "val/loss"
    assert r["feature_cache"]["applied"] is False


def _ssim_reference(a: np.ndarray, b: np.ndarray, size: int, sigma=1.5, k1=0.01, k2=0.03) -> float:
    """Wang et al. 2004, evaluated window by window (one channel, valid positions)."""
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-r ** 2 / (2 * sigma ** 2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = k1 ** 2, k2 ** 2
    values = []
    for i in range(a.shape[0] - size + 1):
        for j in range(a.shape[1] - size + 1):
            pa, pb = a[i:i + size, j:j + size], b[i:i + size, j:j + size]
            ma, mb = (w * pa).sum(), (w * pb).sum()
            va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
            cov = (w * (pa - ma) * (pb - mb)).sum()
            values.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    return float(np.mean(values))


@pytest.mark.parametrize("side, window", [(16, 11), (8, 7), (12, 11)])
def test_ssim_matches_the_formula(side, window):
    from tlbench.recon import ssim, ssim_window_size

    assert ssim_window_size(side, side) == window
    g = torch.Generator().manual_seed(side)
    a = torch.rand(3, 2, side, side, generator=g, dtype=torch.float64)
    b = (a + 0.2 * torch.rand(a.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    ours = ssim(a, b)
    for i in range(3):
        ref = np.mean([_ssim_reference(a[i, c].numpy(), b[i, c].numpy(), window) for c in range(2)])
        assert float(ours[i]) == pytest.approx(ref, abs=1e-10)
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))


def test_bce_loss_is_the_loss_column(tmp_path):
    from tlbench.run import train

    r = train(compose_cfg("model=cae", "loss=bce", "trainer=smoke", "trainer.progress=false"), tmp_path / "bce")
    m = r["test"]["reconstruction"]
    assert m["loss"] != pytest.approx(m["mse"])  # binary cross-entropy, not the squared error
    assert m["loss"] > 0 and math.isfinite(m["loss"])


@pytest.mark.parametrize("overrides, message", [
    (("model=cae", "trainer.monitor=val/accuracy"), "val/loss"),
    (("model=cae", "loss=cross_entropy"), "'mse'"),
    (("model=cnn", "loss=mse"), "model=cae"),
    (("model=cae", "dataset.class_weights=balanced"), "class_weights"),
    (("model=cae", "model.latent=0"), "model.latent"),
    (("model=cnn", "model.init_part=all"), "model.init_from"),
])
def test_config_errors(overrides, message):
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError, match=message):
        compose_cfg(*overrides)


def test_hash_of_classification_configs_is_unchanged():
    """The keys added for this task are left out of the hash at their defaults (older runs resume)."""
    import hashlib
    import json

    from tlbench.config import config_hash, to_dict

    cfg = compose_cfg()
    before = to_dict(cfg)  # the config as runs recorded it before these keys existed
    for key in ("init_part", "latent"):
        del before["model"][key]
    del before["loss"], before["sweep"], before["logger"], before["logger_dir"]
    for key in ("train_fraction", "train_per_class", "pipeline", "tensor_budget_gb"):
        del before["dataset"][key]
    del before["optim"]["impl"]
    for key in ("resume", "progress", "feature_store", "devices", "sync_bn", "compile", "channels_last", "cudnn_benchmark",
                "tf32"):
        del before["trainer"][key]
    assert config_hash(cfg) == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(cfg) != config_hash(dataclasses.replace(cfg, loss="cross_entropy"))
    assert config_hash(compose_cfg("model=cae")) != config_hash(compose_cfg("model=cae", "model.latent=4"))


def test_resume_of_a_cae_run_matches_the_uninterrupted_one(cae_run, tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.run import train

    cfg = compose_cfg(*CAE, "trainer.progress=false")
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(cfg, part, stop_after=1)
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(part))), part)
    assert resumed["test"] == results(cae_run)["test"]


def test_eval_and_compare_of_cae_runs(cae_run, capsys):
    from tlbench.compare import aggregate, collect_runs, resolve_metrics
    from tlbench.evaluate import evaluate_run

    out = evaluate_run(cae_run, "test", {})
    again = results(out)["test"]["reconstruction"]
    assert again == pytest.approx(results(cae_run)["test"]["reconstruction"])
    assert (out / "predictions" / "reconstruction.csv").is_file()
    runs, problems = collect_runs([cae_run])
    assert not problems
    metric = resolve_metrics(runs, None)[0]
    assert (metric.split, metric.name) == ("test", "mse")  # no accuracy: MSE by default
    rows = aggregate(runs, ["model.name"], "test/psnr,test/ssim")
    assert rows and rows[0].stats
