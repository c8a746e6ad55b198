"""The error catalogue: every mistake a user can make on the ``tlbench`` command line.

One parametrized test. Each case runs the real CLI in-process and asserts the contract of a
user error (docs/errors.md lists the same cases):

- exit code 2;
- one ``tlbench: error: ...`` paragraph on stderr that names the offending value;
- no traceback;
- nothing written: every existing file and folder of the test area is byte-identical after the
  command, and the only thing a refused command may leave is a NEW run directory holding at
  most ``status.json`` saying ``{"state": "failed", "message": ...}``.

Cases that need data on disk read tiny datasets written once per module (tests/fixtures_data.py
formats, broken on purpose); cases that target an existing run use one finished run, also built
once per module (model=cnn, trainer=smoke on the embedded digits).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

import fixtures_data as fx
from tlbench.cli import main

SMOKE = ("model=cnn", "trainer=smoke")  # a tiny model, 1 epoch of 2 batches, CPU
COMMANDS = ("eval", "compare", "list", "plan", "download")  # subcommands without a run directory


def C(case_id: str, *argv: str, expect: tuple[str, ...] | str, env: dict | None = None, marks=()):
    """A case: the command line (``{run}``, ``{tmp}``, ``{w}``, ``{data}``, ``{finished}`` are
    filled in), the strings its message must contain, extra environment variables."""
    expect = (expect,) if isinstance(expect, str) else expect
    return pytest.param(list(argv), expect, env or {}, id=case_id, marks=marks)


no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")

CASES = [
    # ------------------------------------------------------------------ config groups and keys
    C("unknown-model", "model=nosuchmodel", expect=("nosuchmodel", "'cnn'")),
    C("unknown-dataset", "dataset=nosuchdata", expect=("nosuchdata", "'sklearn_digits'")),
    C("unknown-freeze", "freeze=nosuchpolicy", expect=("nosuchpolicy", "'linear_probe'")),
    C("unknown-experiment", "+experiment=nosuchpreset", expect=("nosuchpreset", "digits_mlp")),
    C("unknown-key", "trainer.nosuchkey=1", expect=("nosuchkey", "max_epochs")),
    C("unknown-top-level-key", "+nosuchtop=1", expect=("nosuchtop",)),
    C("refused-target", "+model._target_=os.system", expect=("_target_", "--allow-code")),
    C("refused-callbacks", "+hydra.callbacks.x._target_=os.getcwd", expect=("hydra.callbacks", "--allow-code")),
    # ------------------------------------------------------------------ types
    C("type-float", "optim.lr=fast", expect=("optim.lr", "fast", "float")),
    C("type-int", "trainer.max_epochs=two", expect=("trainer.max_epochs", "two", "int")),
    C("type-bool", "trainer.deterministic=maybe", expect=("trainer.deterministic", "maybe", "bool")),
    C("type-list-entry", "head.hidden=[a]", expect=("head.hidden[0]", "'a'")),
    C("type-pair-length", "optim.betas=[0.9]", expect=("optim.betas", "2 values")),
    C("type-not-a-list", "freeze.train=layer4*", expect=("freeze.train='layer4*'", "must be a list", "[layer4*]")),
    C("type-null", "seed=null", expect=("seed=null", "expected int")),
    C("type-in-a-preset-run", "+experiment=digits_mlp", "model.hidden=[a]", expect=("model.hidden[0]='a'", "int")),
    # ------------------------------------------------------------------ choices and ranges
    C("lr-negative", "optim.lr=-0.1", expect=("optim.lr=-0.1", "> 0")),
    C("max-epochs-zero", "trainer.max_epochs=0", expect=("trainer.max_epochs=0", ">= 1")),
    C("val-fraction-above-1", "dataset.val_fraction=1.5", expect=("dataset.val_fraction=1.5", "<= 1")),
    C("val-fraction-zero", "dataset.val_fraction=0", expect=("dataset.val_fraction=0.0", "> 0", "best epoch")),
    C("train-fraction-zero", "dataset.train_fraction=0", expect=("dataset.train_fraction=0.0", "> 0.0")),
    C("train-fraction-and-per-class", "dataset.train_fraction=0.5", "dataset.train_per_class=3",
      expect=("dataset.train_fraction=0.5 and dataset.train_per_class=3", "set one of them")),
    C("fractions-leave-no-train", "dataset.val_fraction=0.5", "dataset.test_fraction=0.5",
      expect=("dataset.val_fraction + dataset.test_fraction", "less than 1")),
    C("precision", "trainer.precision=8", expect=("trainer.precision='8'", "16-mixed")),
    C("monitor-test", "trainer.monitor=test/accuracy", expect=("test/accuracy", "val/loss")),
    C("device-unknown", "trainer.device=tpu", expect=("tpu", "cuda:N")),
    C("layer-decay-zero", "optim.layer_decay=0", expect=("optim.layer_decay=0.0", "> 0")),
    C("betas-out-of-range", "optim.betas=[0.9,1.5]", expect=("optim.betas[1]=1.5", "< 1")),
    C("nesterov-adam", "optim=adam", "optim.nesterov=true", expect=("optim.nesterov", "sgd")),
    C("nesterov-no-momentum", "optim=sgd", "optim.nesterov=true", "optim.momentum=0",
      expect=("optim.nesterov", "optim.momentum=0.0")),
    C("head-hidden-zero", "head.hidden=[0]", expect=("head.hidden=[0]", "positive")),
    C("head-hidden-negative", "head.hidden=[-5]", expect=("head.hidden=[-5]", "positive")),
    C("cnn-no-channels", "model=cnn", "model.channels=[]", expect=("model.channels=[]", "[32,64]")),
    C("cnn-channel-zero", "model=cnn", "model.channels=[8,0]", expect=("model.channels=[8, 0]", "positive")),
    C("mlp-no-hidden", "model=mlp", "model.hidden=[]", expect=("model.hidden=[]", "[256,128]")),
    C("freeze-bn", "freeze.bn=frozen", expect=("frozen", "'train'")),
    C("seed-negative", "seed=-1", expect=("seed=-1", ">= 0")),
    C("logger-unknown", *SMOKE, "logger=[tensorbord,csv]", expect=("'tensorbord' is not a logger", "'mlflow'", "'wandb'")),
    C("logger-not-a-list", *SMOKE, "logger=tensorboard", expect=("logger='tensorboard'", "logger=[tensorboard]")),
    C("quiet-and-verbose", *SMOKE, "--quiet", "--verbose", expect=("--quiet and --verbose contradict",)),
    C("step-gamma-negative", "sched=step", "sched.gamma=-1", expect=("sched.gamma=-1.0", "> 0")),
    C("warmup-beyond-the-run", "sched=cosine", "sched.warmup_epochs=50", "trainer.max_epochs=3",
      expect=("sched.warmup_epochs=50", "trainer.max_epochs=3", "from 0 to 2", "6% of optim.lr")),
    C("plateau-factor", "sched=plateau", "sched.factor=1.5", expect=("sched.factor=1.5", "< 1")),
    C("classes-on-fixed-dataset", "dataset.classes=[cat]", expect=("dataset.classes=['cat']", "sklearn_digits")),
    C("root-on-default-dataset", "dataset.root={data}/cifar10",
      expect=("dataset.root='{data}/cifar10'", "dataset=sklearn_digits (the default) reads no files",
              "did you mean dataset=cifar10?", "image_folder")),
    C("download-without-downloader", "dataset=image_folder", "dataset.root={data}/good", "dataset.download=true",
      expect=("dataset.download=true", "image_folder has no downloader", "cifar10, emnist")),
    C("split-without-variants", "dataset=cifar10", "dataset.split=balanced",
      expect=("dataset.split='balanced'", "dataset=cifar10", "emnist")),
    C("groups-and-layer-decay", "freeze.groups=[stages.0*:1e-3]", "optim.layer_decay=0.5",
      expect=("freeze.groups", "optim.layer_decay=0.5")),
    # ------------------------------------------------------------------ sweeps (-m)
    C("sweep-bad-value", "-m", "optim.lr=0.1,-1", "hydra.sweep.dir={tmp}/sweep", expect=("optim.lr=-1.0",)),
    C("sweep-unknown-option", "-m", "model=cnn,nosuchmodel", "hydra.sweep.dir={tmp}/sweep",
      expect=("nosuchmodel",)),
    C("sweep-empty-value", "-m", "seed=0,,1", "hydra.sweep.dir={tmp}/sweep", expect=("seed=0,,1",)),
    C("sweep-and-cfg", "-m", "seed=0,1", "--cfg", "job", expect=("-m and --cfg cannot be combined", "first job's config: tlbench seed=0 ")),
    C("resolve-without-cfg", "--resolve", expect=("--resolve only works with --cfg",)),
    C("unknown-launcher", "-m", "seed=0,1", "hydra/launcher=slurma", "hydra.sweep.dir={tmp}/sweep",
      expect=("hydra/launcher='slurma'", "'basic'", "'slurm'", "'submitit_local'")),
    C("sweep-job-plan", "-m", "freeze=index", "freeze.trainable_layers=choice([0],[5])", "hydra.sweep.dir={tmp}/sweep",
      expect=("sweep job #1 of 2", "freeze.trainable_layers=[5]", "index 5 is out of range")),
    # ------------------------------------------------------------------ models and weights
    C("arch-missing", *SMOKE[1:], "model=torchvision", "model.pretrained=false", expect=("model.arch",)),
    C("arch-unknown-torchvision", *SMOKE[1:], "model=torchvision", "model.arch=resnet9000", "model.pretrained=false",
      expect=("resnet9000", "torchvision")),
    C("arch-unknown-timm", *SMOKE[1:], "model=timm", "model.arch=nosuch_vit", "model.pretrained=false",
      expect=("nosuch_vit", "timm")),
    C("arch-conflict", *SMOKE[1:], "model=resnet18", "model.arch=vgg16", "model.pretrained=false",
      expect=("model.arch='vgg16'", "resnet18")),
    C("scratch-pretrained", *SMOKE, "model.pretrained=true", expect=("model.pretrained", "'cnn'")),
    C("truncate-unknown", *SMOKE[1:], "model=resnet18", "model.pretrained=false", "model.truncate=layer9",
      expect=("model.truncate='layer9'", "layer4")),
    C("weights-missing", *SMOKE[1:], "model=resnet18", "model.weights={w}/nosuch.pth", expect=("nosuch.pth",)),
    C("weights-garbage", *SMOKE[1:], "model=resnet18", "model.weights={w}/weights/garbage.pth",
      expect=("garbage.pth",)),
    C("weights-not-state-dict", *SMOKE[1:], "model=resnet18", "model.weights={w}/weights/list.pth",
      expect=("list.pth", "state dict")),
    C("weights-other-arch", *SMOKE[1:], "model=resnet18", "model.weights={w}/weights/other.pth",
      expect=("resnet18", "another architecture")),
    C("weights-and-init-from", *SMOKE[1:], "model=resnet18", "model.weights={w}/weights/other.pth",
      "model.init_from={finished}", expect=("model.weights", "model.init_from")),
    C("init-from-not-a-run", *SMOKE[1:], "model=resnet18", "model.pretrained=false", "model.init_from={w}/notrun",
      expect=("notrun", "best.pt")),
    C("init-from-other-backbone", *SMOKE[1:], "model=resnet18", "model.pretrained=false",
      "model.init_from={finished}", expect=("model.init_from", "finished")),
    C("init-from-no-checkpoint", *SMOKE, "model.init_from={w}/notrun",
      expect=("{w}/notrun/checkpoints/best.pt", "tlbench model=cae hydra.run.dir={w}/notrun")),
    C("init-from-shapes", *SMOKE, "model.channels=[16,64]", "model.init_from={finished}",
      expect=("backbone.stages.0.0.weight: source 32x3x3x3, this model 16x3x3x3", "model.channels")),
    C("init-part-encoder-of-classifier", *SMOKE, "model.init_from={finished}", "model.init_part=encoder",
      expect=("model.init_part=encoder", "model=cnn run", "init_part=backbone")),
    C("init-part-without-init-from", *SMOKE, "model.init_part=all", expect=("model.init_part=all", "model.init_from")),
    C("cae-monitor", "model=cae", "trainer=smoke", "trainer.monitor=val/accuracy",
      expect=("trainer.monitor", "val/loss")),
    C("loss-of-classifier", *SMOKE, "loss=mse", expect=("loss='mse'", "model=cae")),
    C("pretrained-not-cached", *SMOKE[1:], "model=resnet18", "model.pretrained=true",
      expect=("resnet18", "{tmp}/torch_home"), env={"TORCH_HOME": "{tmp}/torch_home"}),
    C("head-activation", *SMOKE, "head.activation=swish", expect=("swish", "'gelu'")),
    C("device-cuda-missing", *SMOKE, "trainer.device=cuda", expect=("trainer.device='cuda'",), marks=no_cuda),
    # ------------------------------------------------------------------ freeze policies
    C("pattern-without-globs", *SMOKE, "freeze=pattern", expect=("freeze.train", "stages.0")),
    C("pattern-matches-nothing", *SMOKE, "freeze=pattern", "freeze.train=[layer4*]", expect=("'layer4*'", "stages.1")),
    C("index-out-of-range", *SMOKE, "freeze=index", "freeze.trainable_layers=[5]", expect=("index 5", "stages.1")),
    C("index-empty", *SMOKE, "freeze=index", "freeze.trainable_layers=[]", expect=("freeze.trainable_layers",)),
    C("first-n-too-large", *SMOKE, "freeze=first_n", "freeze.n=5", expect=("freeze.n=5", "2 blocks")),
    C("nothing-trains", *SMOKE, "freeze=linear_probe", "freeze.head=false",
      expect=("freeze.name=linear_probe", "freeze.head=false")),
    C("groups-without-lr", *SMOKE, "freeze.groups=[stages.0]", expect=("'stages.0'", "BLOCK_GLOB:LR")),
    C("groups-match-nothing", *SMOKE, "freeze.groups=[layer9*:1e-3]", expect=("'layer9*:1e-3'", "stages.0")),
    # ------------------------------------------------------------------ datasets
    C("task-unknown", *SMOKE, "dataset.task=nosuchtask", expect=("nosuchtask", "'label'")),
    C("split-empty", *SMOKE, "dataset.val_fraction=0.0001", expect=("val", "dataset.val_fraction")),
    C("train-fraction-too-small", *SMOKE, "dataset.train_fraction=0.002",
      expect=("dataset.train_fraction=0.002 keeps no training item", "dataset.train_per_class=1")),
    C("root-not-set", *SMOKE, "dataset=image_folder", "dataset.root=null",
      expect=("dataset.root is not set", "image_folder")),
    C("root-missing", *SMOKE, "dataset=image_folder", "dataset.root={w}/nosuchdir", expect=("{w}/nosuchdir",)),
    C("root-is-a-file", *SMOKE, "dataset=image_folder", "dataset.root={w}/file.txt",
      expect=("file.txt", "not a folder")),
    C("root-empty", *SMOKE, "dataset=image_folder", "dataset.root={data}/empty",
      expect=("{data}/empty", "class folders")),
    C("root-loose-images", *SMOKE, "dataset=image_folder", "dataset.root={data}/loose",
      expect=("{data}/loose", "2 images directly")),
    C("class-folder-without-images", *SMOKE, "dataset=image_folder", "dataset.root={data}/nonimage",
      expect=("{data}/nonimage/cat", "no images")),
    C("one-class", *SMOKE, "dataset=image_folder", "dataset.root={data}/oneclass", expect=("'cat'", "at least 2")),
    C("corrupt-image", *SMOKE, "dataset=image_folder", "dataset.root={data}/corrupt",
      expect=("broken.png", "dataset.on_bad_image=skip")),
    C("classes-missing", *SMOKE, "dataset=image_folder", "dataset.root={data}/good", "dataset.classes=[cat,dragon]",
      expect=("'dragon'", "'dog'")),
    C("positive-class-unknown", *SMOKE, "dataset=image_folder", "dataset.root={data}/good",
      "eval.positive_class=dragon", expect=("eval.positive_class='dragon'", "'dog'")),
    C("positive-class-not-binary", *SMOKE, "eval.positive_class=7", expect=("eval.positive_class='7'", "10 classes")),
    C("topk-above-classes", *SMOKE, "eval.topk=[1,20]", expect=("eval.topk=[1, 20]", "10 classes")),
    C("topk-equals-classes", *SMOKE, "eval.topk=[1,10]", expect=("eval.topk=[1, 10]", "10 classes")),
    C("image-folder-pre-split", *SMOKE, "dataset=image_folder", "dataset.root={data}/presplit",
      expect=("all split names ('test', 'train')", "pre-split", "dataset.root at {data}/presplit/train",
              "dataset=chest_xray")),
    C("chest-mixed-folders", *SMOKE, "dataset=chest_xray", "dataset.root={data}/chest_mixed",
      expect=("'extra'", "train")),
    C("chest-test-class-unknown", *SMOKE, "dataset=chest_xray", "dataset.root={data}/chest_badtest",
      expect=("Alien", "counterpart")),
    C("digits-missing-digit-folder", *SMOKE, "dataset=handwritten_digits", "dataset.root={data}/hw_bad",
      expect=("{data}/hw_bad/Thai", "missing 7")),
    C("digits-no-languages", *SMOKE, "dataset=handwritten_digits", "dataset.root={data}/empty",
      expect=("{data}/empty", "language folders")),
    C("digits-one-language", *SMOKE, "dataset=handwritten_digits", "dataset.root={data}/hw", "dataset.classes=[Thai]",
      "dataset.task=language", expect=("task 'language'", "1 class ('Thai')", "at least 2", "dataset.task=digit")),
    C("digits-one-language-multitask", *SMOKE, "dataset=handwritten_digits", "dataset.root={data}/hw",
      "dataset.classes=[Thai]", "dataset.task=multitask", expect=("task 'language'", "at least 2")),
    C("digits-task-unknown", *SMOKE, "dataset=handwritten_digits", "dataset.root={data}/hw", "dataset.task=letter",
      expect=("'letter'", "'multitask'")),
    C("emnist-split-unknown", *SMOKE, "dataset=emnist", "dataset.root={data}/emnist", "dataset.split=balancd",
      expect=("'balancd'", "'balanced'")),
    C("emnist-split-absent", *SMOKE, "dataset=emnist", "dataset.root={data}/emnist", "dataset.split=letters",
      expect=("'letters'", "'balanced'")),
    C("emnist-bad-magic", *SMOKE, "dataset=emnist", "dataset.root={data}/emnist_magic",
      expect=("emnist-balanced-train-images-idx3-ubyte", "magic")),
    C("emnist-truncated", *SMOKE, "dataset=emnist", "dataset.root={data}/emnist_trunc",
      expect=("emnist-balanced-train-images-idx3-ubyte", "truncated")),
    C("emnist-bad-mapping", *SMOKE, "dataset=emnist", "dataset.root={data}/emnist_map",
      expect=("emnist-balanced-mapping.txt", "line 1")),
    C("cifar-missing", *SMOKE, "dataset=cifar10", "dataset.root={data}/empty", expect=("data_batch_1", "{data}/empty")),
    C("cifar-corrupt", *SMOKE, "dataset=cifar10", "dataset.root={data}/cifar_bad", expect=("CIFAR-10", "data_batch_1")),
    # ------------------------------------------------------------------ run directories and resume
    C("run-dir-under-a-file", "hydra.run.dir={w}/file.txt/run", expect=("{w}/file.txt", "is a file")),
    C("run-dir-holds-a-run", *SMOKE, "hydra.run.dir={finished}", expect=("{finished}", "trainer.resume")),
    C("run-dir-not-empty", *SMOKE, "hydra.run.dir={w}/notrun", expect=("{w}/notrun", "not empty")),
    C("run-dir-locked", *SMOKE, "hydra.run.dir={w}/locked", expect=("{w}/locked", "in use")),
    C("resume-not-a-run", "trainer.resume={w}/notrun", expect=("{w}/notrun", "not a tlbench run directory")),
    C("resume-missing-dir", "trainer.resume={tmp}/nosuchrun", expect=("{tmp}/nosuchrun",)),
    C("resume-other-config", "trainer.resume={finished}", "optim.lr=0.5", expect=("{finished}", "optim.lr")),
    # ------------------------------------------------------------------ other subcommands
    C("eval-not-a-run", "eval", "{w}/notrun", expect=("{w}/notrun",)),
    C("eval-no-run-dir", "eval", expect=("usage: tlbench eval",)),
    C("eval-bad-split", "eval", "{finished}", "split=bogus", expect=("split='bogus'", "'val'")),
    C("eval-bad-name", "eval", "{finished}", "split=train", "name=../..", expect=("name='../..' is not valid", "no '..'")),
    C("eval-unknown-option", "eval", "{finished}", "splitt=val", expect=("'splitt'", "split=")),
    C("eval-unknown-dataset-key", "eval", "{finished}", "dataset.nosuch=1", expect=("nosuch", "val_fraction")),
    C("eval-bad-dataset-value", "eval", "{finished}", "dataset.val_fraction=2", expect=("dataset.val_fraction=2",)),
    C("eval-task-unknown", "eval", "{finished}", "dataset.task=nosuchtask", expect=("nosuchtask", "'label'")),
    C("eval-root-on-fixed-dataset-run", "eval", "{finished}", "dataset.root={data}/cifar10",
      expect=("dataset.root='{data}/cifar10'", "{finished} was trained on dataset=sklearn_digits", "dataset.root=null")),
    C("compare-not-a-dir", "compare", "{w}/file.txt", expect=("{w}/file.txt", "not a directory")),
    C("compare-no-runs", "compare", "{data}/empty", "--out", "{tmp}/table.md", expect=("{data}/empty", "no run")),
    C("compare-unknown-by", "compare", "{finished}", "--by", "nosuchkey", expect=("'nosuchkey'", "--by")),
    C("compare-unknown-metric", "compare", "{finished}", "--metric", "test/nosuch",
      expect=("'test/nosuch'", "accuracy")),
    C("compare-unknown-format", "compare", "{finished}", "--format", "html", expect=("'html'", "'latex'")),
    C("compare-unknown-flag", "compare", "{finished}", "--bogus", expect=("--bogus",)),
    C("list-unknown-group", "list", "nosuchgroup", expect=("nosuchgroup", "'datasets'")),
    C("plan-pattern-matches-nothing", "plan", *SMOKE, "freeze=pattern", "freeze.train=[zz*]", expect=("'zz*'",)),
    C("download-unknown-model", "download", "model=nosuchmodel", expect=("nosuchmodel",)),
]


# ----------------------------------------------------------------------------- the test area
def _write_world(w: Path) -> None:
    """Datasets (good and broken), weights files, folders that are not runs."""
    data = w / "data"
    (data / "empty").mkdir(parents=True)
    fx.write_class_tree(data / "good", {"cat": 12, "dog": 12}, modes=("L",))
    fx.write_image(data / "loose" / "a.png", 0)
    fx.write_image(data / "loose" / "b.png", 1)
    for name in ("cat", "dog"):
        (data / "nonimage" / name).mkdir(parents=True)
        (data / "nonimage" / name / "notes.txt").write_text("not an image\n")
    fx.write_class_tree(data / "oneclass", {"cat": 3}, modes=("L",))
    fx.write_class_tree(data / "corrupt", {"cat": 3, "dog": 3}, modes=("L",))
    fx.write_corrupt(data / "corrupt" / "dog" / "broken.png")
    fx.write_chest_xray(data / "chest_mixed")
    fx.write_chest_xray(data / "presplit")  # train/ + test/ of class folders: not image_folder's layout
    fx.write_image(data / "chest_mixed" / "extra" / "a.png", 0)
    fx.write_chest_xray(data / "chest_badtest", test={"Covid": 1, "Normal": 1, "Viral_Pneumonia": 1, "Alien": 1})
    fx.write_handwritten_digits(data / "hw", per_digit=2)
    fx.write_handwritten_digits(data / "hw_bad", languages=("Thai",), per_digit=1)
    shutil.rmtree(data / "hw_bad" / "Thai" / "7")
    fx.write_emnist(data / "emnist")
    for name in ("emnist_magic", "emnist_trunc", "emnist_map"):
        fx.write_emnist(data / name)
    raw = "EMNIST/raw/emnist-balanced-train-images-idx3-ubyte"
    blob = (data / "emnist_magic" / raw).read_bytes()
    (data / "emnist_magic" / raw).write_bytes(b"\x00\x00\x09\x99" + blob[4:])
    (data / "emnist_trunc" / raw).write_bytes(blob[:-7])
    (data / "emnist_map" / "EMNIST/raw/emnist-balanced-mapping.txt").write_text("zero 48\n")
    fx.write_cifar10(data / "cifar_bad")
    (data / "cifar_bad" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"not a pickle")
    (w / "notrun").mkdir()
    (w / "notrun" / "notes.txt").write_text("my notes, not a run\n")
    (w / "file.txt").write_text("a plain file\n")
    (w / "locked").mkdir()
    (w / "locked" / ".lock").write_text(f"1 {socket.gethostname()}\n")  # pid 1 is alive: the lock is held
    (w / "weights").mkdir()
    (w / "weights" / "garbage.pth").write_bytes(b"\x00 this is not a torch file")
    torch.save([1, 2, 3], w / "weights" / "list.pth")
    torch.save({"fc.weight": torch.zeros(3, 3)}, w / "weights" / "other.pth")


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # errors raised inside the Hydra task
        return e.code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The shared test area: broken datasets, weights files, and one finished run."""
    w = tmp_path_factory.mktemp("world")
    _write_world(w)
    finished = w / "finished"
    code = _run([*SMOKE, f"hydra.run.dir={finished}", "trainer.progress=false"])
    assert code == 0 and (finished / "results.json").is_file(), "the finished run could not be made"
    return w


def snapshot(roots: dict[str, Path]) -> dict[str, str]:
    """``label/relative/path`` -> sha256 of the file (folders end with ``/``, links hold their target)."""
    out = {}
    for label, root in roots.items():
        for p in sorted(root.rglob("*")):
            key = f"{label}/{p.relative_to(root).as_posix()}"
            if p.is_symlink():
                out[key] = "link -> " + os.readlink(p)
            elif p.is_dir():
                out[key + "/"] = "dir"
            else:
                out[key] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _left_behind(before: dict, after: dict, run_dir: Path) -> list[str]:
    """What the command wrote, beyond what the contract allows (a new run directory holding
    at most a ``failed`` status.json)."""
    problems = [f"changed: {k}" for k in before if k in after and before[k] != after[k]]
    problems += [f"removed: {k}" for k in before if k not in after]
    allowed = {"tmp/run/", "tmp/run/status.json"} if "tmp/run/" not in before else set()
    for k in sorted(set(after) - set(before)):
        if k not in allowed:
            problems.append(f"created: {k}")
        elif k == "tmp/run/status.json":
            status = json.loads((run_dir / "status.json").read_text())
            if status.get("state") != "failed" or "message" not in status:
                problems.append(f"created: {k} with state {status.get('state')!r} (not 'failed')")
    return problems


def _fill(text: str, where: dict[str, Path]) -> str:
    return text.format(**{k: str(v) for k, v in where.items()})


@pytest.mark.parametrize("argv, expect, env", CASES)
def test_user_error(argv, expect, env, world, tmp_path, monkeypatch, capsys):
    where = {"tmp": tmp_path, "run": tmp_path / "run", "w": world, "data": world / "data",
             "finished": world / "finished"}
    argv = [_fill(a, where) for a in argv]
    expect = [_fill(e, where) for e in expect]
    for key, value in env.items():
        monkeypatch.setenv(key, _fill(value, where))
    if argv and argv[0] not in COMMANDS:  # train: into tmp/run unless the case names a run directory
        argv += [] if any(a.startswith("hydra.run.dir=") for a in argv) else [f"hydra.run.dir={where['run']}"]
        argv += ["trainer.progress=false"]
    monkeypatch.chdir(tmp_path)  # anything written to the working directory shows up below
    # a fresh process has no log handlers; earlier in-process runs leave ones bound to closed streams
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    roots = {"tmp": tmp_path, "world": world}
    before = snapshot(roots)
    capsys.readouterr()

    code = _run(argv)

    out, err = capsys.readouterr()
    after = snapshot(roots)
    shown = f"\n--- stderr ---\n{err[-3000:]}\n--- stdout ---\n{out[-1500:]}"
    assert code == 2, f"exit code {code}, expected 2{shown}"
    assert "Traceback" not in out + err, f"a traceback was printed{shown}"
    assert "tlbench: error: " in err, f"no 'tlbench: error:' paragraph on stderr{shown}"
    message = err[err.index("tlbench: error: "):].strip()
    assert "\n\n" not in message, f"the message is not one paragraph{shown}"
    for word in expect:
        assert word in message, f"{word!r} not in the message{shown}"
    left = _left_behind(before, after, where["run"])
    assert not left, "the command wrote files:\n" + "\n".join(left) + shown
