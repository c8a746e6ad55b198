"""The loop's promises: determinism, exact resume, early stopping, one test pass, atomic saves."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import compose_cfg, results

SHORT = ("trainer.max_epochs=3", "trainer.batch_size=128")


def _metrics(res: dict) -> dict:
    return {"epochs": [(e["train"]["loss"], e["val"]["loss"], e["val"]["accuracy"]) for e in res["epochs"]],
            "test": res["test"], "val": res["val"], "best_epoch": res["best_epoch"]}


def test_same_seed_same_results(cli, tmp_path):
    code_a, a = cli(*SHORT, run_dir=tmp_path / "a")
    code_b, b = cli(*SHORT, run_dir=tmp_path / "b")
    assert code_a == code_b == 0
    assert _metrics(results(a)) == _metrics(results(b))
    code_c, c = cli(*SHORT, "seed=1", run_dir=tmp_path / "c")
    assert code_c == 0 and _metrics(results(c)) != _metrics(results(a))
    # the split depends on dataset.split_seed only
    assert json.loads((c / "splits.json").read_text())["test"] == json.loads((a / "splits.json").read_text())["test"]


def test_resume_matches_uninterrupted_run(cli, tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.run import train

    code, full = cli(*SHORT, "optim=sgd", "sched=cosine", run_dir=tmp_path / "full")
    assert code == 0
    cfg = compose_cfg(*SHORT, "optim=sgd", "sched=cosine", "trainer.progress=false")
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(cfg, part, stop_after=1)
    assert torch.load(part / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (part / "results.json").exists()
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(part))), part)
    assert _metrics(resumed) == _metrics(results(full))


def test_resume_from_cli_reuses_original_overrides(cli, tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.run import train

    code, run = cli(*SHORT, run_dir=tmp_path / "run")
    assert code == 0
    before = results(run)
    (run / "results.json").unlink()  # as if it had been interrupted after the last epoch
    from tlbench.cli import main

    assert main([f"trainer.resume={run}"]) == 0
    after = results(run)
    assert after["test"] == before["test"] and after["config_hash"] == before["config_hash"]
    del Interrupted, train


def test_resume_with_other_config_is_refused(cli, tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.errors import TlbenchError
    from tlbench.run import train

    cfg = compose_cfg(*SHORT, "trainer.progress=false")
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "r", stop_after=1)
    other = compose_cfg(*SHORT, "optim.lr=0.5", f"trainer.resume={tmp_path / 'r'}")
    with pytest.raises(TlbenchError, match="optim.lr"):
        train(other, tmp_path / "r")


def test_early_stopping_on_validation(cli, monkeypatch):
    import tlbench.engine as engine

    values = iter([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    monkeypatch.setattr(engine, "monitor_value", lambda monitor, val: next(values))
    code, run = cli("trainer.max_epochs=6", "trainer.patience=2")
    assert code == 0
    res = results(run)
    assert res["epochs_run"] == 3 and res["early_stopped"] and res["best_epoch"] == 1
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == 1


def test_test_split_is_evaluated_exactly_once_on_best(cli, monkeypatch):
    import tlbench.run as run_mod

    calls = {"test": 0}
    real = run_mod.make_loaders

    class Counting:
        def __init__(self, loader):
            self.loader = loader

        def __iter__(self):
            calls["test"] += 1
            return iter(self.loader)

        def __len__(self):
            return len(self.loader)

    def wrapped(bundle, cfg, device):
        loaders = real(bundle, cfg, device)
        loaders["test"] = Counting(loaders["test"])
        return loaders

    monkeypatch.setattr(run_mod, "make_loaders", wrapped)
    code, run = cli(*SHORT)
    assert code == 0 and calls["test"] == 1


def test_best_checkpoint_is_chosen_on_validation(cli):
    code, run = cli("trainer.max_epochs=4", "trainer.monitor=val/accuracy")
    assert code == 0
    res = results(run)
    accs = [e["val"]["accuracy"]["label"] for e in res["epochs"]]
    assert res["best_epoch"] == accs.index(max(accs)) + 1
    assert torch.load(run / "checkpoints" / "best.pt", weights_only=True)["epoch"] == res["best_epoch"]


@pytest.mark.parametrize("monitor,values", [("val/accuracy", [0.5, 0.9, 0.7, 0.8]),
                                            ("val/loss", [0.9, 0.3, 0.5, 0.4])])
def test_best_checkpoint_follows_the_monitored_curve_not_the_last_epoch(cli, monkeypatch, monitor, values):
    """A real run's validation curve often improves every epoch, so best == last and a loop that
    saved best.pt every epoch (or compared in the wrong direction) would pass the test above. Here
    the monitored value peaks at epoch 2 of 4: best.pt must be epoch 2, in both directions; and the
    value the loop monitors is computed from the validation epoch it records."""
    import tlbench.engine as engine

    real, seen, forced = engine.monitor_value, [], iter(values)

    def forced_curve(mon, val):
        seen.append(real(mon, val))
        return next(forced)

    monkeypatch.setattr(engine, "monitor_value", forced_curve)
    code, run = cli("trainer.max_epochs=4", f"trainer.monitor={monitor}")
    assert code == 0
    res = results(run)
    assert res["best_epoch"] == 2
    ckpts = run / "checkpoints"
    assert torch.load(ckpts / "best.pt", weights_only=True)["epoch"] == 2
    assert torch.load(ckpts / "last.pt", weights_only=True)["epoch"] == 4
    recorded = [e["val"]["loss"] if monitor == "val/loss" else e["val"]["accuracy"]["label"] for e in res["epochs"]]
    assert seen == pytest.approx(recorded, rel=1e-12)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    from tlbench.checkpoint import save_atomic

    path = tmp_path / "checkpoints" / "last.pt"
    save_atomic({"epoch": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. the process is interrupted mid-write

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2}, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_checkpoint_contents(cli):
    code, run = cli("trainer.max_epochs=1")
    assert code == 0
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "best", "config", "config_hash"):
        assert key in ckpt
    assert ckpt["config"]["model"]["name"] == "cnn"


@pytest.mark.parametrize("overrides", [
    ("optim=sgd", "optim.nesterov=true", "sched=step", "sched.step_size=1"),
    ("optim=adamw", "sched=cosine", "sched.warmup_epochs=1"),
    ("optim=adam", "sched=plateau", "trainer.grad_clip=1.0"),
    ("model=mlp",),
    ("head.hidden=[32]", "head.dropout=0.2", "optim.head_lr=0.01"),
])
def test_optimizers_schedulers_models_run(cli, overrides):
    code, run = cli("trainer.max_epochs=2", *overrides)
    assert code == 0
    res = results(run)
    assert res["test"]["label"]["accuracy"] > 0.3


def test_default_experiment_reaches_95_percent(cli):
    """What `make demo` promises: the unchanged default config reaches >= 95% test accuracy."""
    code, run = cli()
    assert code == 0
    assert results(run)["test"]["label"]["accuracy"] >= 0.95


def test_eval_subcommand_reproduces_test_and_val_metrics(cli, capsys):
    from tlbench.cli import main

    code, run = cli("trainer.max_epochs=2")
    assert code == 0
    res = results(run)
    assert main(["eval", str(run)]) == 0
    again = json.loads((run / "eval_test" / "results.json").read_text())
    assert again["test"]["label"]["accuracy"] == res["test"]["label"]["accuracy"]
    assert (run / "eval_test" / "predictions" / "label.csv").is_file()
    assert (run / "eval_test" / "figures" / "confusion_label.png").is_file()
    assert main(["eval", str(run), "split=val", "name=v"]) == 0
    val = json.loads((run / "eval_v" / "results.json").read_text())
    assert val["val"]["label"]["accuracy"] == res["val"]["label"]["accuracy"]
    assert main(["eval", str(run), "split=bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["eval", str(run / "nope")]) == 2


def test_cached_features_give_the_same_run_as_the_full_forward(cli, tmp_path):
    """freeze=linear_probe: the frozen backbone's features are computed once; same numbers."""
    code_a, a = cli("freeze=linear_probe", "trainer.max_epochs=2", run_dir=tmp_path / "a")
    code_b, b = cli("freeze=linear_probe", "trainer.max_epochs=2", "trainer.cache_features=false",
                    run_dir=tmp_path / "b")
    assert code_a == code_b == 0
    assert "computed once" in (a / "train.log").read_text()
    assert "computed once" not in (b / "train.log").read_text()
    ra, rb = results(a), results(b)
    for ea, eb in zip(ra["epochs"], rb["epochs"]):
        assert ea["train"]["loss"] == pytest.approx(eb["train"]["loss"], abs=1e-5)
        assert ea["val"]["loss"] == pytest.approx(eb["val"]["loss"], abs=1e-5)
    assert ra["test"]["label"]["accuracy"] == pytest.approx(rb["test"]["label"]["accuracy"], abs=0.01)
    assert ra["params"]["trainable"] == rb["params"]["trainable"] < ra["params"]["total"]


def test_frozen_batchnorm_statistics_do_not_change(cli, tmp_path):
    code, run = cli("freeze=linear_probe", "trainer.max_epochs=1", "trainer.cache_features=false")
    assert code == 0
    first = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    from tlbench.run import build_everything, seed_everything

    seed_everything(0)
    _, model, _ = build_everything(compose_cfg("freeze=linear_probe"))
    init = model.state_dict()
    for k, v in first.items():
        if k.startswith("backbone.") and ("running_" in k or "weight" in k or "bias" in k):
            assert torch.equal(v, init[k]), f"{k} changed although the backbone is frozen"


def test_gradual_unfreezing_trains_more_blocks_and_resumes_exactly(cli, tmp_path):
    from tlbench.engine import Interrupted
    from tlbench.run import train

    over = ("freeze=last_block", "freeze.gradual=1", "trainer.max_epochs=3", "optim=sgd", "sched=cosine")
    code, full = cli(*over, run_dir=tmp_path / "full")
    assert code == 0
    res = results(full)
    log = (full / "train.log").read_text()
    assert "gradual unfreezing" in log
    assert res["params"]["trainable"] == res["params"]["total"]  # both cnn stages train by the end
    cfg = compose_cfg(*over, "trainer.progress=false")
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(cfg, part, stop_after=2)
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(part))), part)
    assert _metrics(resumed) == _metrics(res)


def test_plan_command_text_and_json(capsys):
    from tlbench.cli import main

    assert main(["plan", "freeze=last_block"]) == 0
    text = capsys.readouterr().out
    assert "stages.1" in text and "trainable" in text
    assert main(["plan", "freeze=index", "freeze.trainable_layers=[-1]", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    blocks = {b["name"]: b["trainable"] for b in data["blocks"]}
    assert blocks == {"stages.0": False, "stages.1": True}
    assert main(["plan", "freeze=index", "freeze.trainable_layers=[5]"]) == 2
    assert "stages.0" in capsys.readouterr().err


def test_a_finished_run_is_never_overwritten(cli, capsys):
    code, run = cli("trainer.max_epochs=1")
    assert code == 0
    before = (run / "results.json").read_bytes(), (run / "checkpoints" / "best.pt").read_bytes()
    code, _ = cli("trainer.max_epochs=1", "seed=3")
    assert code == 2 and "trainer.resume=" in capsys.readouterr().err
    assert before == ((run / "results.json").read_bytes(), (run / "checkpoints" / "best.pt").read_bytes())


def test_hparams_view_holds_the_chosen_keys_and_final_metrics(cli):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    code, run = cli("model=mlp", "optim.lr=0.01", "trainer.max_epochs=1")
    assert code == 0
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    infos = [plugin_data_pb2.HParamsPluginData.FromString(c).session_start_info
             for c in acc.PluginTagToContent("hparams").values()]
    hp = next(i.hparams for i in infos if i.hparams)
    assert {"model.name", "optim.lr", "trainer.max_epochs", "seed"} <= set(hp)
    assert hp["model.name"].string_value == "mlp" and hp["optim.lr"].number_value == 0.01
    assert "hparam/test_accuracy_label" in acc.Tags()["scalars"]


def test_checkpoint_keeps_the_cuda_rng_of_this_process_device_only(monkeypatch):
    """On CUDA a checkpoint keeps the RNG of the run's own device: get_rng_state_all() would open
    a context on every visible GPU from every DDP rank and could not be restored where fewer GPUs
    are visible. Older checkpoints (a list, one per GPU) restore this device's entry; a CPU run
    (CUDA never initialized) records none."""
    from tlbench import checkpoint

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: calls.append("all") or [])
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": calls.append(("set", int(s[0]))))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: calls.append("set all"))
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert "cuda_device" not in checkpoint.rng_state() and "cuda" not in checkpoint.rng_state()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    state = checkpoint.rng_state()
    assert int(state["cuda_device"][0]) == 7 and "cuda" not in state
    checkpoint.set_rng_state(state)
    old = {k: v for k, v in state.items() if k != "cuda_device"}
    checkpoint.set_rng_state({**old, "cuda": [torch.tensor([3], dtype=torch.uint8), torch.tensor([4], dtype=torch.uint8)]})
    checkpoint.set_rng_state({**old, "cuda": [torch.tensor([3], dtype=torch.uint8)]})  # written with fewer GPUs
    assert calls == [("set", 7), ("set", 4)]
