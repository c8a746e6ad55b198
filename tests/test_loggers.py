"""The loggers (issue #16): ``logger=[tensorboard,csv]`` by default, optional offline ``mlflow`` and
``wandb``; the full hyperparameter set in TensorBoard's HPARAMS; a sweep's runs named by their
overrides; a failing logger never costs a finished result. Nothing here touches the network."""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path

import pytest

from conftest import BrokenLogger, results

SHORT = ("trainer.max_epochs=2", "trainer.batch_size=128")


@pytest.fixture
def no_internet(monkeypatch):
    """Every connection attempt to anything but a local socket is recorded and refused."""
    tried = []
    real = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1", "localhost"):
            tried.append(address)
            raise OSError(f"tests never connect (to {address})")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setenv("WANDB_MODE", "online")  # tlbench forces offline whatever the environment says
    return tried


def _hparams(tb_dir: Path):
    """(hyperparameters, metric tags of the HPARAMS session, scalar tags) read back from the events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    data = [plugin_data_pb2.HParamsPluginData.FromString(c) for c in acc.PluginTagToContent("hparams").values()]
    start = next(d.session_start_info for d in data if d.HasField("session_start_info"))
    exp = next(d.experiment for d in data if d.HasField("experiment"))
    hp = {k: (v.string_value if v.HasField("string_value") else v.bool_value if v.HasField("bool_value")
              else v.number_value) for k, v in start.hparams.items()}
    return hp, {m.name.tag for m in exp.metric_infos}, acc


def test_hparams_hold_the_full_config_and_the_final_metrics(cli):
    code, run = cli(*SHORT, "optim.lr=0.002")
    assert code == 0
    res = results(run)
    hp, metric_tags, acc = _hparams(run / "tb")
    # keys never typed on the command line are there too, with the values the run used
    assert hp["optim.lr"] == pytest.approx(0.002) and hp["trainer.batch_size"] == 128 and hp["batch_size"] == 128
    assert hp["model.name"] == "cnn" and hp["dataset.name"] == "sklearn_digits" and hp["freeze.name"] == "full"
    assert hp["optim.name"] == "adam" and hp["sched.name"] == "none" and hp["seed"] == 0
    assert hp["trainer.max_epochs"] == 2 and hp["trainer.monitor"] == "val/loss"
    assert hp["model.channels"] == "[32,64]" and hp["dataset.root"] == "null"
    assert not {"trainer.resume", "trainer.progress", "logger"} & set(hp)  # not hyperparameters
    # the final metrics, in the same run (one events file), equal to results.json
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1
    for split in ("val", "test"):
        for key in ("accuracy", "macro_f1", "loss"):
            tag = f"hparam/{split}_{key}_label"
            assert tag in metric_tags
            assert acc.Scalars(tag)[-1].value == pytest.approx(res[split]["label"][key], rel=1e-6)
    # metrics.csv (logger csv, on by default): one row per epoch, the values of results.json
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 and rows[0].startswith("epoch,train_loss,val_loss")
    assert float(rows[2].split(",")[2]) == pytest.approx(res["epochs"][1]["val"]["loss"], rel=1e-6)


def test_logger_choice_controls_tensorboard_and_csv(cli, tmp_path):
    code, run = cli(*SHORT, "logger=[csv]", run_dir=tmp_path / "csv")
    assert code == 0 and (run / "metrics.csv").is_file() and not (run / "tb").exists()
    assert results(run)["test"]["label"]["accuracy"] > 0.5
    code, run = cli(*SHORT, "logger=[]", run_dir=tmp_path / "none")
    assert code == 0 and not (run / "metrics.csv").exists() and not (run / "tb").exists()
    assert (run / "results.json").is_file() and (run / "checkpoints" / "best.pt").is_file()


@pytest.mark.parametrize("value, needle", [("[tensorbord,csv]", "'tensorbord' is not a logger"),
                                           ("[mlflo]", "'mlflo' is not a logger"),
                                           ("tensorboard", "must be a list, e.g. logger=[tensorboard]")])
def test_unknown_logger_is_refused_with_the_valid_names(cli, capsys, value, needle):
    code, run = cli(f"logger={value}")
    err = capsys.readouterr().err
    assert code == 2 and needle in err and not run.exists()
    if "not a logger" in needle:
        assert all(f"'{n}'" in err for n in ("tensorboard", "csv", "mlflow", "wandb"))


def test_a_logger_that_is_not_installed_is_refused_before_the_run(cli, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, run = cli(*SHORT, "logger=[tensorboard,wandb]")
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'tlbench[wandb]'" in err
    assert not (run / "results.json").exists() and not (run / "tb").exists()


def test_mlflow_local_file_store(cli, no_internet):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    code, run = cli(*SHORT, "optim.lr=0.002", "logger=[tensorboard,mlflow]")
    assert code == 0 and no_internet == []
    res = results(run)
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    [mrun] = client.search_runs([client.get_experiment_by_name("tlbench").experiment_id])
    assert mrun.info.run_name == "trainer.max_epochs=2,trainer.batch_size=128,optim.lr=0.002"
    assert mrun.info.status == "FINISHED"
    params = mrun.data.params
    assert params["optim.lr"] == "0.002" and params["model.name"] == "cnn" and params["freeze.name"] == "full"
    history = client.get_metric_history(mrun.info.run_id, "loss/val")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([e["val"]["loss"] for e in res["epochs"]])
    assert mrun.data.metrics["hparam/test_accuracy_label"] == pytest.approx(res["test"]["label"]["accuracy"])
    arts = {a.path for a in client.list_artifacts(mrun.info.run_id, "figures")}
    assert "figures/confusion_label.png" in arts


def _wandb_records(run_dir: Path):
    """The records of W&B's offline ``run-*.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    [path] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    pos, block, out, buf = 7, 32768, [], b""  # a 7-byte header (":W&B", version), then 32 KiB blocks
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
    return out


def test_wandb_offline_run(cli, no_internet):
    pytest.importorskip("wandb")
    code, run = cli(*SHORT, "optim.lr=0.002", "logger=[wandb]")
    assert code == 0 and no_internet == []
    res = results(run)
    records = _wandb_records(run)
    config, history, summary = {}, [], {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update})
    assert config["optim.lr"] == pytest.approx(0.002) and config["model.name"] == "cnn"
    epochs = [h for h in history if "loss/val" in h]
    assert [h["epoch"] for h in epochs] == [1, 2]
    assert [h["loss/val"] for h in epochs] == pytest.approx([e["val"]["loss"] for e in res["epochs"]])
    assert summary["hparam/test_accuracy_label"] == pytest.approx(res["test"]["label"]["accuracy"])


def test_a_failing_logger_never_costs_the_result(cli, monkeypatch):
    """Every optional logger and TensorBoard itself fail: the run still finishes with its results."""
    import torch.utils.tensorboard

    from tlbench import loggers

    monkeypatch.setattr(loggers, "MlflowLogger", BrokenLogger)

    def broken_scalar(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch.utils.tensorboard.SummaryWriter, "add_scalar", broken_scalar)
    code, run = cli(*SHORT, "logger=[tensorboard,csv,mlflow]")
    assert code == 0
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    assert results(run)["test"]["label"]["accuracy"] > 0.5 and (run / "checkpoints" / "best.pt").is_file()
    log = (run / "train.log").read_text()
    assert "logger mlflow failed and is off for the rest of this run (RuntimeError: store is gone)" in log
    assert "logger tensorboard failed and is off for the rest of this run (OSError: disk full)" in log
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # the csv logger is unaffected


def test_a_sweep_names_its_tensorboard_runs_by_their_overrides(tmp_path):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

    from tlbench.cli import main
    from tlbench.compare import aggregate
    from tlbench.runs import collect_runs

    sweep = tmp_path / "sweep"
    code = main(["-m", "optim.lr=0.01,0.002", "trainer.max_epochs=1", "trainer.progress=false",
                 f"hydra.sweep.dir={sweep}"])
    assert code == 0
    names = {p.name: p for p in (sweep / "tb").iterdir()}
    assert set(names) == {"optim.lr=0.01,trainer.max_epochs=1", "optim.lr=0.002,trainer.max_epochs=1"}
    assert names["optim.lr=0.01,trainer.max_epochs=1"].resolve() == (sweep / "0" / "tb").resolve()
    mux = EventMultiplexer().AddRunsFromDirectory(str(sweep / "tb"))  # as `tensorboard --logdir SWEEP/tb`
    mux.Reload()
    assert set(mux.Runs()) == set(names)
    assert "loss/val" in mux.Runs()["optim.lr=0.002,trainer.max_epochs=1"]["tensors"]
    runs, problems = collect_runs([sweep])  # the links are no run directories to compare
    assert problems == [] and len(runs) == 2 and len(aggregate(runs, by=["optim.lr"])) == 2


def test_run_names():
    from tlbench.loggers import run_name

    assert run_name([]) == "defaults"
    assert run_name(["optim.lr=0.021240374487011344", "freeze=last_block", "trainer.progress=false",
                     "trainer.resume=/x", "logger=[csv]", "hydra.run.dir=/y"]) == "optim.lr=0.02124,freeze=last_block"
    assert run_name(["dataset.root=../../data/x"]) == "dataset.root=.._.._data_x"  # one folder, never a path
    long = run_name([f"model.weights={'w' * 400}"])
    assert len(long.encode()) <= 200 and long.startswith("model.weights=www")


def test_a_resumed_run_continues_its_mlflow_run(tmp_path, no_internet):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from conftest import compose_cfg
    from tlbench.engine import Interrupted
    from tlbench.run import train

    run = tmp_path / "r"
    args = (*SHORT, "trainer.progress=false", "logger=[mlflow]")
    with pytest.raises(Interrupted):
        train(compose_cfg(*args), run, stop_after=1)
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    exp = client.get_experiment_by_name("tlbench").experiment_id
    [first] = client.search_runs([exp])
    assert first.info.status == "KILLED"  # an interrupted run, as MLflow says it
    train(compose_cfg(*args, f"trainer.resume={run}"), run)
    [again] = client.search_runs([exp])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(again.info.run_id, "loss/val")] == [1, 2]
    assert no_internet == []
