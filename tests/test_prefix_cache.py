"""The frozen-prefix cache (issue #12) in real runs: it applies where the trainable part is a
suffix, gives the run the uncached path gives (sample by sample, flips included), records
itself in results.json, and is computed once per sweep through the feature store."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from conftest import compose_cfg

TINY = ("model=cnn", "model.channels=[8,16,16]", "freeze=last_block", "trainer.max_epochs=2",
        "trainer.batch_size=64", "trainer.progress=false")


def _train(cfg, rd):
    from tlbench.run import train

    return train(cfg, rd)


def _with(cfg, **trainer):
    return dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, **trainer))


def _numbers(res):
    return ([(e["train"]["loss"], e["val"]["loss"], e["val"]["accuracy"]["label"]) for e in res["epochs"]],
            res["test"]["label"]["loss"], res["test"]["label"]["accuracy"])


@pytest.mark.parametrize("augment", ["none", "flip"])
def test_cached_run_equals_the_uncached_run(tmp_path, augment):
    cfg = compose_cfg(*TINY, f"dataset.augment={augment}", "trainer.feature_dtype=float32")  # exactness
    cached = _train(cfg, tmp_path / "cached")
    plain = _train(_with(cfg, cache_features="false"), tmp_path / "plain")
    fc = cached["feature_cache"]
    assert fc["applied"] and fc["split_block"] == "stages.2" and not fc["reused"]
    assert plain["feature_cache"]["applied"] is False
    (ep_c, tl_c, ta_c), (ep_p, tl_p, ta_p) = _numbers(cached), _numbers(plain)
    assert ta_c == ta_p
    assert np.allclose(np.array(ep_c, dtype=float), np.array(ep_p, dtype=float), rtol=1e-4, atol=1e-6)
    assert tl_c == pytest.approx(tl_p, rel=1e-4)
    # the frozen prefix really stayed frozen, and the cached run trained the same suffix
    import torch

    a = torch.load(tmp_path / "cached" / "checkpoints" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "checkpoints" / "best.pt", weights_only=True)["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-5), k


def test_a_sweep_computes_the_prefix_once(tmp_path, monkeypatch):
    """Jobs that differ in lr and head share the stored prefix outputs (with a pretrained
    backbone, seeds too; here the prefix is random-init, so the seed is part of its weights)."""
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    calls = []
    import tlbench.features as features

    real = features._prefix_pass
    monkeypatch.setattr(features, "_prefix_pass", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = [_train(compose_cfg(*TINY, f"optim.lr={lr}", f"head.hidden={h}"), tmp_path / f"r{i}")
               for i, (lr, h) in enumerate([(1e-3, "[]"), (1e-2, "[]"), (1e-3, "[16]")])]
    assert len(calls) == 3  # train, val, test: once for the three jobs
    assert [r["feature_cache"]["reused"] for r in results] == [False, True, True]
    assert len({r["feature_cache"]["store_key"] for r in results}) == 1
    entries = [p for p in (tmp_path / "cache" / "features").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(entries) == 3
    assert results[0]["test"] != results[1]["test"]  # the jobs still trained differently
    other_seed = _train(compose_cfg(*TINY, "seed=1"), tmp_path / "seed1")
    assert not other_seed["feature_cache"]["reused"]  # another random init: other prefix weights


@pytest.mark.parametrize("overrides, reason", [
    (("freeze=full",), "nothing before"),
    (("dataset.augment=flip_crop",), "random per epoch"),
    (("freeze.gradual=1",), "freeze.gradual"),
])
def test_cache_not_applied_says_why(tmp_path, overrides, reason):
    cfg = compose_cfg(*TINY[:2], "trainer.max_epochs=1", "trainer.progress=false", *overrides)
    res = _train(cfg, tmp_path / "r")
    assert res["feature_cache"]["applied"] is False and reason in res["feature_cache"]["reason"]
    assert reason in (tmp_path / "r" / "train.log").read_text()


def test_linear_probe_uses_the_same_store(tmp_path):
    cfg = compose_cfg(*TINY[:2], "freeze=linear_probe", "trainer.max_epochs=1", "trainer.progress=false")
    res = _train(cfg, tmp_path / "r")
    fc = res["feature_cache"]
    assert fc["applied"] and fc["split_block"] is None and "whole backbone" in fc["reason"]
    assert json.loads((tmp_path / "r" / "results.json").read_text())["time"]["feature_cache_s"] == fc["compute_s"]


def test_a_middle_block_splits_there_and_frozen_blocks_after_it_run_in_the_suffix(tmp_path):
    cfg = compose_cfg(*TINY[:2], "freeze=pattern", "freeze.train=[stages.1*]", "trainer.max_epochs=1",
                      "trainer.progress=false")
    res = _train(cfg, tmp_path / "r")
    assert res["feature_cache"]["applied"] and res["feature_cache"]["split_block"] == "stages.1"


def test_plan_reports_the_cache_decision_flops_and_store_size(capsys):
    from tlbench.cli import main

    assert main(["plan", "model=deit_tiny", "model.pretrained=false", "freeze=last_block", "--json"]) == 0
    c = json.loads(capsys.readouterr().out)["prefix_cache"]
    assert c["applied"] and c["split_block"] == "blocks.11"
    fl = c["flops_per_image"]
    assert fl["prefix"] > 10 * fl["suffix"] > 0  # 11 frozen blocks vs 1 trainable (+ norm)
    assert c["expected_speedup_per_epoch"] == pytest.approx((fl["prefix"] + 3 * fl["suffix"]) / (3 * fl["suffix"]))
    assert c["store_bytes_per_image"] == 197 * 192 * 2  # the token sequence, float16
    assert main(["plan", "model=deit_tiny", "model.pretrained=false", "freeze=full"]) == 0
    assert "prefix cache:  not applied: " in capsys.readouterr().out


def test_plan_and_run_decide_the_same(tmp_path, capsys):
    from tlbench.cli import main

    args = [*TINY[:2], "freeze=pattern", "freeze.train=[stages.1*]"]
    assert main(["plan", *args, "--json"]) == 0
    planned = json.loads(capsys.readouterr().out)["prefix_cache"]
    res = _train(compose_cfg(*args, "trainer.max_epochs=1", "trainer.progress=false"), tmp_path / "r")
    assert {k: res["feature_cache"][k] for k in ("applied", "reason", "split_block")} == \
        {k: planned[k] for k in ("applied", "reason", "split_block")}


def test_cache_modes_and_store_location(tmp_path, monkeypatch, capsys):
    from tlbench.cli import main
    from tlbench.errors import TlbenchError

    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    # true where it cannot apply: refused before the run starts, naming why
    with pytest.raises(TlbenchError, match="cache_features=true.*nothing before"):
        _train(compose_cfg(*TINY[:2], "freeze=full", "trainer.cache_features=true"), tmp_path / "full")
    assert not (tmp_path / "full" / "checkpoints").exists()
    # feature_store=null: computed for this run only, nothing on disk; a path: there
    res = _train(compose_cfg(*TINY, "trainer.max_epochs=1", "trainer.feature_store=null"), tmp_path / "a")
    assert res["feature_cache"]["applied"] and res["feature_cache"]["store"] is None
    assert not (tmp_path / "cache").exists()
    res = _train(compose_cfg(*TINY, "trainer.max_epochs=1", f"trainer.feature_store={tmp_path / 'mine'}"),
                 tmp_path / "b")
    assert res["feature_cache"]["store"] == str(tmp_path / "mine") and len(list((tmp_path / "mine").iterdir())) == 3
    # the default: $TLBENCH_CACHE/features; the location is not part of the config hash
    res2 = _train(compose_cfg(*TINY, "trainer.max_epochs=1"), tmp_path / "c")
    assert res2["feature_cache"]["store"] == str(tmp_path / "cache" / "features")
    assert res2["config_hash"] == res["config_hash"]
    assert main(["plan", *TINY[:2], "freeze=full", "trainer.cache_features=true"]) == 2


def test_outputs_larger_than_the_memory_budget_are_memory_mapped(tmp_path, monkeypatch):
    """Above the budget the stored outputs are written batch by batch into a memory map and read
    from it, and the run is the same as in memory."""
    import tlbench.features as features
    import tlbench.store as store

    seen = []
    real = features.FeatureSplit.__init__

    def spy(self, h, h_flip, labels, indices):
        seen.append(isinstance(h, np.memmap))
        real(self, h, h_flip, labels, indices)

    monkeypatch.setattr(features.FeatureSplit, "__init__", spy)
    cfg = compose_cfg(*TINY, "trainer.max_epochs=1")
    in_memory = _train(cfg, tmp_path / "mem")
    assert seen == [False] * 3
    monkeypatch.setattr(store, "MMAP_BYTES", 0)
    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "other_cache"))
    mapped = _train(cfg, tmp_path / "map")
    assert seen[3:] == [True] * 3
    assert _numbers(mapped) == _numbers(in_memory)



def test_outputs_computed_another_way_are_stored_apart(tmp_path, monkeypatch):
    """bf16 autocast (or a GPU) gives other prefix outputs than 32-bit on the CPU: a bf16 run does
    not reuse a 32-bit run's entry, nor the reverse. (bf16 autocast runs on the CPU too; the run
    is made to take it here.) The CPU 32-bit key has no such part, so entries stored before it
    existed keep their keys."""
    import torch

    import tlbench.speed as speed
    from tlbench.engine import LoopOptions
    from tlbench.features import compute_key

    monkeypatch.setenv("TLBENCH_CACHE", str(tmp_path / "cache"))
    fp32 = _train(compose_cfg(*TINY), tmp_path / "fp32")
    monkeypatch.setattr(speed, "amp_dtype", lambda device, precision: torch.bfloat16)
    bf16 = [_train(compose_cfg(*TINY, "trainer.precision=bf16-mixed"), tmp_path / f"bf16_{i}") for i in range(2)]
    assert bf16[0]["speed"]["autocast"] == "bfloat16"
    assert [fp32["feature_cache"]["reused"], bf16[0]["feature_cache"]["reused"], bf16[1]["feature_cache"]["reused"]] \
        == [False, False, True]
    assert fp32["feature_cache"]["store_key"] != bf16[0]["feature_cache"]["store_key"]
    keys = [compute_key(LoopOptions(device=torch.device(d), dtype=t))
            for d, t in (("cpu", None), ("cuda", None), ("cuda", torch.bfloat16), ("cuda", torch.float16))]
    assert keys[0] == {} and keys[1:] == [{"compute": "cuda:float32"}, {"compute": "cuda:bfloat16"},
                                          {"compute": "cuda:float16"}]
