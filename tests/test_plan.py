"""``tlbench plan`` needs neither weights nor images (#16).

The plan of a config must equal what ``build_everything`` (the run's own build) gives, in every
part that does not depend on the weights: tasks and class names, blocks, parameter counts, what
trains, optimizer groups, BatchNorm layers, input spec. It must get there without decoding an
image (every image reader raises while it runs), without reading or downloading a weight file,
and, where the class list is known without the files, without the data on disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fixtures_data as fx
from tlbench.cli import main

REPO = Path(__file__).resolve().parents[1]
DROP = ("weights", "tasks", "classes_from", "prefix_cache")  # plan-only keys


def _fail(what: str):
    def raiser(*a, **k):
        raise AssertionError(f"tlbench plan {what}")

    return raiser


def _no_images(mp: pytest.MonkeyPatch, headers: bool = False) -> None:
    """Every way the data code reads image pixels (and the weight files) raises. ``headers``:
    Pillow may open a file to read its size, but not decode it."""
    import PIL.Image
    import PIL.ImageFile

    import tlbench.build
    import tlbench.data
    from tlbench.data import base, cifar10, emnist, folders
    from tlbench.models import weights

    if headers:
        mp.setattr(PIL.ImageFile.ImageFile, "load", _fail("decoded an image"))
    else:
        mp.setattr(PIL.Image, "open", _fail("opened an image"))
    mp.setattr(base.Source, "image", _fail("read an image"))
    mp.setattr(folders, "find_bad_images", _fail("verified the images"))
    mp.setattr(cifar10, "_read_batch", _fail("read a CIFAR-10 batch"))
    mp.setattr(emnist, "read_idx", _fail("read EMNIST images"))
    mp.setattr(tlbench.data, "build_data", _fail("built the data"))
    mp.setattr(tlbench.build, "build_everything", _fail("built the run's parts"))
    mp.setattr(weights, "load_file", _fail("read a weight file"))
    mp.setattr(torch, "load", _fail("read a torch file"))


def _plan_json(capsys, *overrides: str) -> dict:
    assert main(["plan", *overrides, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _reference(*overrides: str) -> tuple[dict, dict]:
    """(plan data, tasks) from the run's own build."""
    from tlbench.build import build_everything, seed_everything
    from tlbench.compose import compose
    from tlbench.plan import plan_data

    cfg = compose(list(overrides))
    seed_everything(cfg.seed)
    bundle, model, plan = build_everything(cfg)
    return json.loads(json.dumps(plan_data(model, plan))), bundle.tasks


def _write(kind: str, root: Path) -> list[str]:
    """A tiny dataset of ``kind`` under ``root``; the overrides that select it."""
    if kind == "cifar10":
        fx.write_cifar10(root, per_batch=20, n_test=10)
    elif kind == "emnist":
        fx.write_emnist(root, n_train=94, n_test=47)
    elif kind == "image_folder":
        fx.write_class_tree(root, {"cat": 6, "dog": 5, "owl": 5})
    elif kind == "chest_xray":
        fx.write_chest_xray(root, train={"Covid": 5, "Normal": 5, "Viral_Pneumonia": 5})
    elif kind == "handwritten_digits":
        fx.write_handwritten_digits(root, per_digit=3)
    return [f"dataset={kind}", f"dataset.root={root}", "dataset.stratify=false"]


CASES = {  # id: (dataset kind or None for the embedded digits, overrides)
    "digits-cnn": (None, ["model=cnn"]),
    "cifar10-cnn": ("cifar10", ["model=cnn"]),
    "cifar10-resnet18-pretrained": ("cifar10", ["model=resnet18", "model.pretrained=true", "model.image_size=32",
                                                "freeze=last_block", "optim.weight_decay=0.01"]),
    "emnist-cnn": ("emnist", ["model=cnn", "model.in_chans=1"]),
    "image_folder-cnn": ("image_folder", ["model=cnn", "dataset.classes=[cat,owl]"]),
    "chest_xray-deit_tiny": ("chest_xray", ["model=deit_tiny", "model.pretrained=false", "model.image_size=32",
                                            "freeze=linear_probe"]),
    "handwritten_digits-language-cnn": ("handwritten_digits", ["model=cnn", "dataset.task=language"]),
    "handwritten_digits-multitask-mlp": ("handwritten_digits", ["model=mlp", "model.image_size=16",
                                                                "dataset.task=multitask"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_plan_reads_no_image_and_matches_the_run(case, tmp_path, capsys, monkeypatch):
    kind, overrides = CASES[case]
    over = (_write(kind, tmp_path / "data") if kind else []) + overrides
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights
    with pytest.MonkeyPatch.context() as mp:
        _no_images(mp)
        got = _plan_json(capsys, *over)
    # the run's build needs weights: the reference is the same architecture with random init
    ref, tasks = _reference(*[o.replace("pretrained=true", "pretrained=false") for o in over])
    assert got["tasks"] == tasks
    assert {k: v for k, v in got.items() if k not in DROP and k != "weights_source"} == \
           {k: v for k, v in ref.items() if k != "weights_source"}
    if "model.pretrained=true" in over:
        assert got["weights"]["cached"] is False
    else:
        assert got["weights_source"] == ref["weights_source"] == "random init"


def test_plan_reads_image_headers_only_for_a_native_size_mlp(tmp_path, capsys):
    """The mlp's first layer is sized by the images: the plan reads one file's header for it,
    and decodes nothing."""
    over = [*_write("image_folder", tmp_path / "data"), "model=mlp"]
    with pytest.MonkeyPatch.context() as mp:
        _no_images(mp, headers=True)
        got = _plan_json(capsys, *over)
    ref, _ = _reference(*over)
    assert got["params"] == ref["params"] and got["blocks"] == ref["blocks"]


@pytest.mark.parametrize("kind, overrides, classes", [
    ("sklearn_digits", [], [str(d) for d in range(10)]),
    ("cifar10", [], fx.CIFAR_NAMES),
    ("emnist", [], list(fx.BALANCED)),
    ("emnist", ["dataset.split=letters"], [chr(c) for c in range(ord("a"), ord("z") + 1)]),
])
def test_plan_without_the_data_on_disk(kind, overrides, classes, tmp_path, capsys):
    with pytest.MonkeyPatch.context() as mp:
        _no_images(mp)
        # sklearn_digits reads no files: a dataset.root for it is refused (validation.check_dataset_keys)
        root = [] if kind == "sklearn_digits" else [f"dataset.root={tmp_path / 'nothing'}"]
        got = _plan_json(capsys, f"dataset={kind}", *root, *overrides)
    assert got["tasks"] == {"label": classes}


@pytest.mark.parametrize("kind", ["image_folder", "chest_xray", "handwritten_digits"])
def test_plan_of_a_folder_dataset_needs_its_folders(kind, tmp_path, capsys):
    assert main(["plan", f"dataset={kind}", f"dataset.root={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and str(tmp_path / "nothing") in err


def _hf_cache(hub: Path, repo: str) -> Path:
    """An (empty) cached file in the hub cache layout: the plan only looks, never reads."""
    rev = "0123456789abcdef0123456789abcdef01234567"
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(rev)
    (root / "snapshots" / rev).mkdir(parents=True)
    path = root / "snapshots" / rev / "model.safetensors"
    path.write_bytes(b"")
    return path


def test_plan_says_whether_the_weights_are_cached_and_where(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    tv = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    hub = tmp_path / "hf" / "hub"
    with pytest.MonkeyPatch.context() as mp:
        _no_images(mp)
        for model, where in (("resnet18", str(tv)), ("deit_tiny", str(hub / "models--timm--deit_tiny_patch16_224"))):
            assert main(["plan", f"model={model}"]) == 0
            text = capsys.readouterr().out
            assert f"weights file:  MISSING (looked for {where}" in text
            assert f"`tlbench download model={model}` fetches them" in text
        tv.parent.mkdir(parents=True)
        tv.write_bytes(b"")
        deit = _hf_cache(hub, "timm/deit_tiny_patch16_224.fb_in1k")
        for model, path, source in (("resnet18", tv, f"torchvision IMAGENET1K_V1 from {tv}"),
                                    ("deit_tiny", deit, f"timm timm/deit_tiny_patch16_224.fb_in1k from {deit}")):
            assert main(["plan", f"model={model}"]) == 0
            text = capsys.readouterr().out
            assert f"weights:       {source}\nweights file:  cached, {path}\n" in text
            assert _plan_json(capsys, f"model={model}")["weights"] == {
                "source": source, "path": str(path), "cached": True, "fix": ""}
        got = _plan_json(capsys, "model=resnet18", f"model.weights={tmp_path / 'nosuch.pth'}")
        assert got["weights"]["cached"] is False and got["weights"]["path"] == str(tmp_path / "nosuch.pth")
        got = _plan_json(capsys, "model=resnet18", "model.pretrained=false")
        assert got["weights"] == {"source": "random init", "path": None, "cached": None, "fix": ""}


def _model_configs() -> list[str]:
    return sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))


ARCH = {"torchvision": "model.arch=resnet34", "timm": "model.arch=convnext_atto"}


def test_every_shipped_model_plans_without_allocating_the_backbone(capsys):
    """Each conf/model config plans offline with its backbone on the meta device (no tensor
    storage, so no init and no weights), and the plan names every block."""
    from tlbench.compose import compose
    from tlbench.plan import build_plan

    with pytest.MonkeyPatch.context() as mp:
        _no_images(mp)
        for name in _model_configs():
            over = [f"model={name}", *([ARCH[name]] if name in ARCH else [])]
            model, plan, _, _ = build_plan(compose(over))
            meta = {p.is_meta for p in model.backbone.parameters()}
            assert meta == ({False} if name in ("cnn", "mlp", "cae") else {True}), name  # scratch: built as in a run
            assert plan.blocks and plan.total == sum(p.numel() for p in model.parameters()), name
