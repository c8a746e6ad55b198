"""The CUDA switches (issue #13, ``speed.py``): which one is on for which device and config, how
each is applied, and that results.json records them. All on CPU: a CUDA device is only named
(``torch.device("cuda")`` needs no GPU) where the decision is a pure function of it."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from conftest import compose_cfg, results
from tlbench import speed
from tlbench.config import Config, OptimConfig, TrainerConfig, config_hash, to_dict
from tlbench.validation import to_config
from tlbench.engine import LoopOptions, batch_to, run_epoch
from tlbench.errors import TlbenchError
from tlbench.optim import build_optimizer, optimizer_impl

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
CONV = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
VIT = nn.Sequential(nn.Conv2d(3, 8, 16, stride=16), nn.Linear(8, 8))  # patch embedding only
MLP = nn.Sequential(nn.Linear(8, 8))


def decide(device, model=CONV, optim=None, **trainer):
    return speed.decide(Config(trainer=TrainerConfig(**trainer), optim=optim or OptimConfig()), device, model)


@pytest.mark.parametrize("device,model,trainer,expect", [
    (CPU, CONV, {}, dict(compile=False, channels_last=False, cudnn_benchmark=False, tf32=False, optimizer="default")),
    (CUDA, CONV, {}, dict(compile=True, channels_last=True, cudnn_benchmark=False, tf32=False, optimizer="fused")),
    (CUDA, VIT, {}, dict(channels_last=False)),
    (CUDA, MLP, {}, dict(channels_last=False)),
    (CUDA, CONV, {"deterministic": False}, dict(cudnn_benchmark=True, tf32=True)),
    (CPU, CONV, {"deterministic": False}, dict(cudnn_benchmark=False, tf32=False)),
    (CPU, MLP, {"compile": "true", "channels_last": "true", "tf32": "true"}, dict(compile=True, channels_last=True,
                                                                                tf32=True)),
    (CUDA, CONV, {"compile": "false", "channels_last": "false", "deterministic": False, "cudnn_benchmark": "false",
                  "tf32": "false"}, dict(compile=False, channels_last=False, cudnn_benchmark=False, tf32=False)),
], ids=["cpu", "cuda", "cuda-vit", "cuda-mlp", "cuda-nondeterministic", "cpu-nondeterministic", "cpu-forced-on",
        "cuda-forced-off"])
def test_which_switch_is_on_for_which_device_and_config(device, model, trainer, expect):
    s = decide(device, model, **trainer)
    assert {k: getattr(s, k) for k in expect} == expect


@pytest.mark.parametrize("device,precision,bf16,expect", [
    (CUDA, "16-mixed", True, ("16-mixed", "float16", True)),
    (CUDA, "bf16-mixed", True, ("bf16-mixed", "bfloat16", False)),
    (CUDA, "32", True, ("32", None, False)),
    (CUDA, "auto", True, ("bf16-mixed", "bfloat16", False)),
    (CUDA, "auto", False, ("32", None, False)),
    (CPU, "16-mixed", True, ("32", None, False)),  # autocast needs CUDA here: 32-bit, said in the log
    (CPU, "auto", True, ("32", None, False)),
])
def test_autocast_and_a_grad_scaler_only_for_float16(monkeypatch, device, precision, bf16, expect):
    monkeypatch.setattr(speed, "bf16_supported", lambda: bf16)
    s = decide(device, precision=precision)
    assert (s.precision, s.autocast, s.grad_scaler) == expect
    assert s.dtype == {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}[expect[1]]


def test_the_run_makes_a_grad_scaler_only_when_the_decision_says_so():
    from tlbench.run import _new_state

    class Plan:
        groups = [{"params": list(MLP.parameters())}]

    for precision, scaler in (("16-mixed", True), ("bf16-mixed", False), ("32", False)):
        s = dataclasses.replace(decide(CUDA, precision=precision), device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GradScaler("cuda") without CUDA disables itself, loudly
            state = _new_state(Config(), MLP, Plan(), s)
        assert (state.scaler is not None) is scaler, precision


def test_backend_flags_are_set_on_cuda_only():
    """cuDNN benchmark and TF32 on CUDA only; TF32 is set so that both torch's legacy getters
    (``allow_tf32``, ``get_float32_matmul_precision``: Inductor's autotuning reads them) and the new
    ``fp32_precision`` settings stay readable and agree (setting ``fp32_precision`` directly makes
    the legacy getters raise)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        s = decide(CUDA, MLP, deterministic=False)
        speed.apply(dataclasses.replace(s, device="cpu"), nn.Linear(2, 2))
        assert torch.backends.cudnn.benchmark == saved[0]  # untouched off CUDA
        speed.apply(s, nn.Linear(2, 2))
        assert torch.backends.cudnn.benchmark is True
        assert torch.backends.cuda.matmul.allow_tf32 is True and torch.backends.cudnn.allow_tf32 is True
        assert torch.backends.cuda.matmul.fp32_precision == torch.backends.cudnn.conv.fp32_precision == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
        speed.apply(decide(CUDA, MLP), nn.Linear(2, 2))  # deterministic: off, IEEE fp32
        assert torch.backends.cudnn.benchmark is False and torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.allow_tf32 is False and torch.backends.cudnn.allow_tf32 is False
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.backends.cudnn.benchmark = saved[0]
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def test_channels_last_converts_the_model_and_4d_batches():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))
    speed.apply(decide(CPU, model, channels_last="true"), model)
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    opts = LoopOptions(device=CPU, channels_last=True)
    assert batch_to(torch.randn(2, 3, 8, 8), opts).is_contiguous(memory_format=torch.channels_last)
    assert batch_to(torch.randn(2, 5, 8), opts).shape == (2, 5, 8)  # tokens: left as they are
    assert not batch_to(torch.randn(2, 3, 8, 8), LoopOptions(device=CPU)).is_contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_implementations(monkeypatch, name):
    params = list(nn.Linear(4, 2).parameters())
    opt = lambda impl: build_optimizer([{"params": params}], OptimConfig(name=name, impl=impl))  # noqa: E731
    assert not opt("auto").defaults.get("fused") and opt("auto").defaults.get("foreach") is None
    fused = opt("fused")
    assert fused.defaults["fused"] is True
    params[0].grad = torch.ones_like(params[0])
    params[1].grad = torch.ones_like(params[1])
    fused.step()  # the fused kernel runs here (this torch has one for CPU)
    assert opt("foreach").defaults["foreach"] is True and opt("loop").defaults["foreach"] is False
    assert optimizer_impl("auto", CUDA) == "fused"
    monkeypatch.setattr("tlbench.optim.fused_devices", lambda: ["cuda"])
    with pytest.raises(TlbenchError, match="optim.impl=fused: this torch has no fused optimizer kernels for cpu"):
        opt("fused")


def test_fused_sgd_takes_newly_trainable_parameters(cli, tmp_path):
    """Gradual unfreezing hands the rebuilt optimizer the trained parameters' momentum buffers;
    the newly trainable ones have none. Fused SGD (optim.impl=auto on CUDA) cannot mix the two:
    the buffers are filled so that the fused run trains like the loop one, also when resumed
    in the middle."""
    args = ("optim=sgd", "freeze=linear_probe", "freeze.gradual=1", "trainer.max_epochs=3", "trainer.batch_size=256")
    out = {}
    for impl in ("fused", "loop"):
        code, rd = cli(*args, f"optim.impl={impl}", run_dir=tmp_path / impl)
        assert code == 0, (rd / "train.log").read_text()[-1500:]
        out[impl] = results(rd)
    for ea, eb in zip(out["fused"]["epochs"], out["loop"]["epochs"]):
        assert ea["train"]["loss"] == pytest.approx(eb["train"]["loss"], rel=1e-4)
    from tlbench.engine import Interrupted
    from tlbench.run import train

    cfg = compose_cfg(*args, "optim.impl=fused", "trainer.progress=false")
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(cfg, part, stop_after=2)
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(part))), part)
    assert resumed["epochs"][-1]["train"]["loss"] == pytest.approx(out["loop"]["epochs"][-1]["train"]["loss"], rel=1e-4)


def test_zero_momentum_buffers_give_torchs_first_step():
    """fill_momentum's zero buffer = torch's missing buffer (started at the gradient), also with
    nesterov and weight decay."""
    from tlbench.optim import fill_momentum

    for nesterov in (False, True):
        torch.manual_seed(0)
        a, b = nn.Linear(3, 2), nn.Linear(3, 2)
        b.load_state_dict(a.state_dict())
        steps = []
        for net, fill in ((a, False), (b, True)):
            opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
            net.weight.grad, net.bias.grad = torch.ones_like(net.weight), torch.ones_like(net.bias)
            opt.state[net.bias]["momentum_buffer"] = torch.full_like(net.bias, 0.5)  # trained before
            if fill:
                fill_momentum(opt)
                assert torch.equal(opt.state[net.weight]["momentum_buffer"], torch.zeros_like(net.weight))
            opt.step()
            steps.append(net.weight.detach().clone())
        assert torch.equal(steps[0], steps[1])


@pytest.mark.parametrize("section,key,value,message", [
    ("trainer", "compile", "maybe", r"trainer.compile='maybe' is not valid; choose one of 'auto', 'false', 'true'"),
    ("trainer", "channels_last", "yes", r"trainer.channels_last='yes' is not valid"),
    ("trainer", "tf32", "on", r"trainer.tf32='on' is not valid"),
    ("optim", "impl", "turbo", r"optim.impl='turbo' is not valid; choose one of 'auto', 'foreach', 'fused', 'loop'"),
    ("trainer", "precision", "8", r"trainer.precision='8' is not valid; choose one of .*'auto'"),
    ("trainer", "cudnn_benchmark", "true", r"trainer.cudnn_benchmark=true .* trainer.deterministic=false"),
])
def test_bad_switch_values_name_the_valid_ones(section, key, value, message):
    base = to_dict(Config())
    with pytest.raises(TlbenchError, match=message):
        to_config({**base, section: {**base[section], key: value}})


def test_switches_accept_booleans_and_leave_the_config_hash_alone():
    base = to_dict(Config())
    cfg = to_config({**base, "trainer": {**base["trainer"], "compile": True, "deterministic": False,
                                         "cudnn_benchmark": True, "channels_last": False},
                     "dataset": {**base["dataset"], "pipeline": "loader"}, "optim": {**base["optim"], "impl": "fused"}})
    assert (cfg.trainer.compile, cfg.trainer.cudnn_benchmark, cfg.trainer.channels_last) == ("true", "true", "false")
    assert config_hash(cfg) == config_hash(dataclasses.replace(cfg, trainer=dataclasses.replace(
        Config().trainer, deterministic=False), dataset=Config().dataset, optim=Config().optim))


def test_evaluation_and_the_frozen_prefix_pass_run_in_inference_mode():
    from tlbench.features import _prefix_pass

    seen = []

    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return {"label": self.lin(x)} if x.dim() == 2 else x

    data = [(torch.randn(3, 4), {"label": torch.tensor([0, 1, 0])})]
    run_epoch(Probe(), data, ["label"], LoopOptions(device=CPU))
    assert seen == [True]
    run_epoch(Probe(), data, ["label"], LoopOptions(device=CPU), optimizer=torch.optim.SGD(Probe().parameters(), 0.1))
    assert seen == [True, False]
    cfg = Config(trainer=TrainerConfig(batch_size=2))
    images = torch.utils.data.TensorDataset(torch.randn(3, 2, 2, 2), torch.zeros(3))
    _prefix_pass(Probe(), images, 3, cfg, LoopOptions(device=CPU), np.float32)
    assert seen[2:] == [True]  # one batch (at least 64 a batch)


def test_results_record_every_switch(cli):
    code, rd = cli("trainer.max_epochs=1", "trainer.channels_last=true")
    assert code == 0
    s = results(rd)["speed"]
    assert s["pipeline"]["mode"] == "tensor" and s["device"] == "cpu"
    assert {k: s[k] for k in ("precision", "autocast", "grad_scaler", "channels_last", "compile", "optimizer",
                              "cudnn_benchmark", "tf32")} == {
        "precision": "32", "autocast": None, "grad_scaler": False, "channels_last": True, "compile": False,
        "optimizer": "default", "cudnn_benchmark": False, "tf32": False}
    assert s["inference_mode"] == {"eval": True, "frozen_prefix_pass": False}


def test_channels_last_trains_to_the_same_numbers(cli, tmp_path):
    out = []
    for cl in ("false", "true"):
        code, rd = cli("trainer.max_epochs=2", "trainer.num_threads=1", f"trainer.channels_last={cl}",
                       run_dir=tmp_path / cl)
        assert code == 0
        out.append(results(rd))
    assert out[0]["epochs"][-1]["train"]["loss"] == pytest.approx(out[1]["epochs"][-1]["train"]["loss"], rel=1e-4)
    assert out[0]["test"]["label"]["accuracy"] == pytest.approx(out[1]["test"]["label"]["accuracy"], abs=0.01)


@pytest.mark.parametrize("freeze,compiled_type", [("full", "TLModel"), ("linear_probe", "SuffixNet")])
def test_compile_wraps_what_the_batches_run_through(cli, monkeypatch, freeze, compiled_type):
    """``trainer.compile=true``: torch.compile (a stub here: a real compile takes minutes on this
    CPU; scripts/bench_gpu.sh compiles for real) gets the model, or suffix + heads when the frozen
    prefix is cached, and every training and evaluation batch goes through what it returned."""
    calls, forwards = [], {"n": 0}

    class Compiled(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            forwards["n"] += 1
            return self.net(x)

    def fake_compile(net, **kw):
        calls.append(type(net).__name__)
        return Compiled(net)

    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(speed, "compile_probe", lambda device: None)  # compile works on this machine
    code, rd = cli("trainer.max_epochs=1", "trainer.compile=true", f"freeze={freeze}", "trainer.batch_size=256")
    assert code == 0 and calls == [compiled_type]
    r = results(rd)
    assert r["speed"]["compile"] is True
    steps = sum(-(-r["epochs"][0][s]["n"] // 256) for s in ("train", "val"))  # + the final val and test pass
    assert forwards["n"] >= steps + 2


def test_a_graph_that_fails_to_compile_runs_eagerly(cli, monkeypatch):
    """A model's graph that fails to compile (the compiler works, this graph does not) costs the
    speed-up, never the run: the real torch.compile with a failing backend, TorchDynamo's
    suppress_errors falling back to eager."""
    real, tried = torch.compile, {"n": 0}

    def failing_backend(gm, example_inputs):
        tried["n"] += 1
        raise RuntimeError("this graph does not compile")

    monkeypatch.setattr(torch, "compile", lambda net, **kw: real(net, backend=failing_backend))
    monkeypatch.setattr(speed, "compile_probe", lambda device: None)
    code, rd = cli("trainer.max_epochs=1", "trainer.compile=true", "freeze=full", "trainer.batch_size=512")
    assert code == 0 and tried["n"] >= 1
    assert results(rd)["speed"]["compile"] is True and results(rd)["test"]["label"]["accuracy"] > 0.1


def _aot_backend(fail_forward: bool, fail_backward: bool, calls: list):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def compiler(which: str, fail: bool):
        def go(gm, example_inputs):
            calls.append(which)
            if fail:
                raise RuntimeError(f"no {which} compiler here")
            return make_boxed_func(gm)
        return go

    return aot_autograd(fw_compiler=compiler("forward", fail_forward), bw_compiler=compiler("backward", fail_backward))


@pytest.mark.parametrize("fail_forward,fail_backward", [(True, False), (False, True)])
def test_a_machine_where_compile_fails_runs_eagerly_and_says_why(cli, monkeypatch, fail_forward, fail_backward):
    """No working compiler on the machine (a missing Triton/C++ compiler): the backward graph is
    compiled lazily inside loss.backward(), where suppress_errors does not reach, so without the
    probe the run would end at its first step. The probe (a tiny model, forward and backward)
    finds it; the run trains eagerly, warns, and records speed.compile=false with the error."""
    real, calls = torch.compile, []
    backend = _aot_backend(fail_forward, fail_backward, calls)
    monkeypatch.setattr(torch, "compile", lambda net, **kw: real(net, backend=backend))
    monkeypatch.setattr(speed, "_PROBED", {})
    code, rd = cli("trainer.max_epochs=1", "trainer.compile=true", "freeze=full", "trainer.batch_size=512")
    assert code == 0, (rd / "train.log").read_text()[-2000:]
    r = results(rd)
    assert r["speed"]["compile"] is False and r["test"]["label"]["accuracy"] > 0.1
    assert "compiler here" in r["speed"]["compile_error"]
    assert "running eagerly" in (rd / "train.log").read_text()
    assert calls[-1] == ("forward" if fail_forward else "backward")  # the probe met the failure, nothing after it


def test_compile_probe_passes_where_compile_works(monkeypatch):
    real, calls = torch.compile, []
    backend = _aot_backend(False, False, calls)
    monkeypatch.setattr(torch, "compile", lambda net, **kw: real(net, backend=backend))
    monkeypatch.setattr(speed, "_PROBED", {})
    assert speed.compile_probe(torch.device("cpu")) is None and calls == ["forward", "backward"]
    assert speed.compile_probe(torch.device("cpu")) is None and len(calls) == 2  # once per process


def test_deterministic_runs_fix_the_cublas_workspace(monkeypatch):
    """trainer.deterministic=true on CUDA needs CUBLAS_WORKSPACE_CONFIG before cuBLAS starts, or
    every matmul warns and may differ between runs; seed_everything sets it (a user's value wins),
    and leaves it alone when determinism is off."""
    import os

    from tlbench.build import seed_everything

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, deterministic=False)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    seed_everything(0, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
