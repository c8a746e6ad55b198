"""model.init_from between tlbench runs (tlbench.transfer): a cae's encoder into the default cnn
with no other flag, bit-equal; mismatches name both shapes; a missing source says how to make
it; freeze policies keep a transferred encoder unchanged; plan and results.json say where the
blocks came from; cross-dataset transfer gets new heads and must line up its input."""

from __future__ import annotations

import json

import pytest
import torch

import fixtures_data as fx
from conftest import compose_cfg, results

FAST = ("trainer.max_epochs=1", "trainer.batch_size=128", "trainer.progress=false")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """A finished cae run and a finished cnn classifier run on the embedded digits."""
    from tlbench.run import train

    root = tmp_path_factory.mktemp("sources")
    train(compose_cfg("model=cae", *FAST), root / "cae")
    train(compose_cfg("model=cnn", *FAST), root / "cnn")
    return root


def _best(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "best.pt", weights_only=True)["model"]


def _backbone(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.startswith("backbone.")}


def _build(*overrides):
    from tlbench.build import build_everything

    return build_everything(compose_cfg(*overrides))


def test_cae_encoder_loads_bit_equal_into_the_default_cnn(sources):
    _, model, _ = _build("model=cnn", f"model.init_from={sources / 'cae'}")
    src, ours = _backbone(_best(sources / "cae")), _backbone(model.state_dict())
    assert set(src) == set(ours) and len(ours) == 12  # conv + BN (weights, biases, running stats) x 2 stages
    for k in ours:
        assert torch.equal(ours[k], src[k]), k
    assert model.transfer["blocks"] == ["stages.0", "stages.1"] and model.transfer["heads"] == "new (random init)"


def test_shape_mismatch_lists_both_shapes(sources):
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError, match=r"stages.0.0.weight: source 32x3x3x3, this model 16x3x3x3") as e:
        _build("model=cnn", "model.channels=[16,64]", f"model.init_from={sources / 'cae'}")
    assert "model.channels" in str(e.value)
    with pytest.raises(TlbenchError, match=r"the source has more: backbone.stages.1"):
        _build("model=cnn", "model.channels=[32]", f"model.init_from={sources / 'cae'}")


def test_missing_source_says_which_file_and_how_to_make_it(tmp_path):
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError) as e:
        _build("model=cnn", f"model.init_from={tmp_path / 'nothing'}")
    text = str(e.value)
    assert str(tmp_path / "nothing" / "checkpoints" / "best.pt") in text
    assert f"tlbench model=cae hydra.run.dir={tmp_path / 'nothing'}" in text


def test_missing_source_from_the_cli_exits_2_and_writes_nothing_else(cli, tmp_path, capsys):
    code, run_dir = cli("model=cnn", f"model.init_from={tmp_path / 'nothing'}")
    assert code == 2
    assert "best.pt" in capsys.readouterr().err
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.parametrize("policy, frozen", [("linear_probe", True), ("first_n", True), ("full", False)])
def test_freeze_policies_apply_to_the_transferred_encoder(sources, tmp_path, policy, frozen):
    from tlbench.run import train

    extra = ["freeze.n=2"] if policy == "first_n" else []
    train(compose_cfg("model=cnn", f"freeze={policy}", *extra, f"model.init_from={sources / 'cae'}", *FAST),
          tmp_path / "run")
    src, after = _backbone(_best(sources / "cae")), _backbone(_best(tmp_path / "run"))
    unchanged = all(torch.equal(src[k], after[k]) for k in src)
    assert unchanged is frozen


def test_results_and_plan_record_the_source(sources, tmp_path, capsys):
    from tlbench.cli import main
    from tlbench.run import train

    r = train(compose_cfg("model=cnn", "freeze=linear_probe", f"model.init_from={sources / 'cae'}", *FAST),
              tmp_path / "run")
    src = results(sources / "cae")
    info = r["init_from"]
    assert (info["config_hash"], info["dataset_fingerprint"]) == (src["config_hash"], src["dataset_fingerprint"])
    assert (info["model"], info["part"], info["finished"]) == ("cae", "backbone", True)
    assert info["epoch"] == src["best_epoch"]
    assert r["weights_source"].startswith(f"run {sources / 'cae'}")
    assert src["input_shape"] == [3, 8, 8] and src["init_from"] is None
    assert main(["plan", "model=cnn", f"model.init_from={sources / 'cae'}", "freeze=last_block"]) == 0
    out = capsys.readouterr().out
    assert f"transferred:   stages.0, stages.1 (12 tensors, init_part=backbone) from {sources / 'cae'}" in out
    assert f"config {src['config_hash']}" in out


def test_init_part_encoder_and_all(sources):
    from tlbench.errors import TlbenchError

    with pytest.raises(TlbenchError, match="model=cnn run; use model.init_part=backbone"):
        _build("model=cnn", f"model.init_from={sources / 'cnn'}", "model.init_part=encoder")
    _build("model=cnn", f"model.init_from={sources / 'cae'}", "model.init_part=encoder")
    _, model, _ = _build("model=cnn", f"model.init_from={sources / 'cnn'}", "model.init_part=all")
    src = _best(sources / "cnn")
    assert all(torch.equal(v, src[k]) for k, v in model.state_dict().items())  # every tensor, heads included
    with pytest.raises(TlbenchError, match=r"heads.label.weight: source 10x64, this model 47x64.*init_part=backbone"):
        _build("model=cnn", f"model.init_from={sources / 'cnn'}", "model.init_part=all", *_emnist(sources),
               "model.image_size=8")
    with pytest.raises(TlbenchError, match=r"the source lacks heads.language.*init_part=backbone for new heads"):
        _build("model=cnn", f"model.init_from={sources / 'cnn'}", "model.init_part=all", *_thai(sources),
               "dataset.task=language", "model.image_size=8")
    with pytest.raises(TlbenchError, match="the source lacks heads.label"):
        _build("model=cnn", f"model.init_from={sources / 'cae'}", "model.init_part=all")


def _emnist(sources) -> list[str]:
    root = sources / "emnist"
    if not root.exists():
        fx.write_emnist(root, n_train=47 * 10, n_test=47)
    return ["dataset=emnist", f"dataset.root={root}"]


def _thai(sources) -> list[str]:
    root = sources / "hd"
    if not root.exists():
        fx.write_handwritten_digits(root, per_digit=4)
    return ["dataset=handwritten_digits", f"dataset.root={root}"]


def test_cross_dataset_new_heads_and_the_input_must_line_up(sources, tmp_path):
    """A digits classifier into handwritten digits (language task: 2 classes): the backbone is
    copied, the head is new; the 28x28 images must be resized to the source's 8x8 explicitly."""
    from tlbench.errors import TlbenchError
    from tlbench.run import train

    with pytest.raises(TlbenchError, match=r"fed 3x8x8 images .* this run feeds 3x28x28; .* model.image_size=8"):
        _build("model=cnn", f"model.init_from={sources / 'cnn'}", *_thai(sources))
    with pytest.raises(TlbenchError, match=r"model.in_chans=3"):
        _build("model=cnn", f"model.init_from={sources / 'cnn'}", *_thai(sources), "model.image_size=8",
               "model.in_chans=1")
    r = train(compose_cfg("model=cnn", f"model.init_from={sources / 'cnn'}", *_thai(sources), "model.image_size=8",
                          "dataset.task=language", "freeze=linear_probe", *FAST), tmp_path / "run")
    assert r["init_from"]["tasks"] == {"label": [str(d) for d in range(10)]} and r["tasks"]["language"]
    best = _best(tmp_path / "run")
    assert best["heads.language.weight"].shape == (2, 64)
    src = _backbone(_best(sources / "cnn"))
    assert all(torch.equal(best[k], v) for k, v in src.items())


def test_a_cae_can_start_from_a_classifier_backbone(sources):
    """The mechanism is one: a cae's encoder from a cnn classifier (init_part=backbone)."""
    _, model, _ = _build("model=cae", f"model.init_from={sources / 'cnn'}")
    src = _backbone(_best(sources / "cnn"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in src.items())
    assert json.dumps(model.transfer)  # JSON-able for results.json


def test_emnist_cae_transfer_recipe_two_steps(cli, tmp_path, capsys):
    """The preset's step 2 before step 1: exit 2 naming the checkpoint and the first step; after
    step 1 (the cae) a step-2 job (cnn, frozen encoder) loads it."""
    from tlbench.cli import main

    root = tmp_path / "emnist"
    fx.write_emnist(root, n_train=47 * 6, n_test=47)
    data = [f"dataset.root={root}", "trainer=smoke"]
    step1 = tmp_path / "outputs" / "emnist_cae_transfer" / "cae"
    step2 = ["experiment=emnist_cae_transfer", "model=cnn", f"model.init_from={step1}", "freeze=linear_probe", *data]
    code, _ = cli(*step2, run_dir=tmp_path / "early")
    assert code == 2
    err = capsys.readouterr().err
    assert f"no checkpoint at {step1 / 'checkpoints' / 'best.pt'}" in err
    assert "`tlbench experiment=emnist_cae_transfer`" in err
    assert main(["experiment=emnist_cae_transfer", *data, f"hydra.run.dir={step1}", "trainer.progress=false"]) == 0
    code, run_dir = cli(*step2, run_dir=tmp_path / "job")
    assert code == 0
    r = results(run_dir)
    assert r["init_from"]["model"] == "cae" and r["params"]["trainable"] == 64 * 47 + 47
