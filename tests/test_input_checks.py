"""Inputs that used to be read wrong or checked too late: 16-bit PNGs in folder datasets, and
the eval settings that need the dataset's classes (``validation.check_tasks``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fixtures_data as fx
from tlbench.config import Config, DatasetConfig, EvalConfig
from tlbench.validation import check_tasks
from tlbench.data import build_data
from tlbench.errors import TlbenchError
from tlbench.models.base import InputSpec

# identity normalization: the tensors are the pixel values in [0, 1]
PLAIN = InputSpec(size=0, channels=3, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), resize=False)
SIZE = (16, 16)  # square: the folder loader's resize to the first image's size is then a no-op


def _tree(root, write) -> None:
    """ROOT/<a|b>/img_<k>.png, 6 images per class; ``write(path, label, k)`` writes one."""
    for label, name in enumerate(("a", "b")):
        for k in range(6):
            write(root / name / f"img_{k}.png", label, k)


def _pixels(root) -> dict[str, torch.Tensor]:
    cfg = DatasetConfig(name="image_folder", root=str(root), val_fraction=0.25, test_fraction=0.25)
    bundle = build_data(cfg, PLAIN)
    return {s: getattr(bundle, s)[list(range(len(getattr(bundle, s))))][0] for s in ("train", "val", "test")}


def _gray16(label: int, k: int) -> np.ndarray:
    return fx.gray16(SIZE, seed=100 * label + k)


def _rgb16(label: int, k: int) -> np.ndarray:
    return np.stack([fx.gray16(SIZE, seed=1000 * c + 100 * label + k) for c in range(3)], -1)


@pytest.mark.parametrize("levels", [_gray16, _rgb16], ids=["gray16", "rgb16"])
def test_16bit_png_reads_like_its_8bit_version(tmp_path, levels):
    """Pillow opens 16-bit grayscale PNGs as I;16, and its convert() clips: 99.6% of the pixels
    became 255. The loader scales by 1/257 instead (16-bit RGB already opens as 8-bit)."""
    from PIL import Image

    _tree(tmp_path / "png16", lambda p, lab, k: fx.write_png16(p, levels(lab, k)))
    _tree(tmp_path / "png8", lambda p, lab, k: (p.parent.mkdir(parents=True, exist_ok=True),
                                                Image.fromarray(fx.to_8bit(levels(lab, k))).save(p)))
    got, want = _pixels(tmp_path / "png16"), _pixels(tmp_path / "png8")
    for split in want:
        assert got[split].shape == want[split].shape
        assert (got[split] - want[split]).abs().max().item() <= 1 / 255 + 1e-6, split
    # and the images are not saturated: their mean gray level is mid-range, like the 8-bit files
    assert 0.3 < float(got["train"].mean()) < 0.7


def test_16bit_full_range_maps_onto_8bit_full_range():
    from PIL import Image

    from tlbench.data.base import to_8bit

    a = np.array([[0, 128, 129, 257, 32896, 65278, 65535]], dtype=np.uint16)
    out = np.asarray(to_8bit(Image.fromarray(a)))
    assert out.dtype == np.uint8 and out.tolist() == [[0, 0, 1, 1, 128, 254, 255]]


# ----------------------------------------------------------------------------- check_tasks
def _cfg(**ev) -> Config:
    return Config(eval=EvalConfig(**ev))


TEN = {"label": [str(d) for d in range(10)]}
BINARY = {"label": ["Covid", "Normal"]}
MULTI = {"digit": [str(d) for d in range(10)], "language": ["English", "Thai"]}


@pytest.mark.parametrize("topk, tasks, words", [
    ((1, 20), TEN, ["eval.topk=[1, 20]", "top-20", "'label' has 10 classes"]),
    ((1, 10), TEN, ["top-10", "10 classes"]),  # top-10 of 10 classes is always 1
    ((1, 3), {"label": ["a", "b", "c"]}, None),  # the default: exempt (reported where it applies)
    ((1, 5), MULTI, None),  # reported for the digit task
    ((1, 12), MULTI, ["top-12", "'language' has 2 classes"]),
    ((2,), BINARY, ["top-2"]),
])
def test_topk_must_be_below_the_number_of_classes(topk, tasks, words):
    if words is None:
        check_tasks(_cfg(topk=topk), tasks)
        return
    with pytest.raises(TlbenchError) as e:
        check_tasks(_cfg(topk=topk), tasks)
    for w in words:
        assert w in str(e.value)


def test_default_topk_passes_on_a_binary_task():
    check_tasks(Config(), BINARY)  # [1, 3]: top-3 is simply not reported for 2 classes


@pytest.mark.parametrize("positive, tasks, words", [
    ("Covid", BINARY, None),
    ("covid", BINARY, ["'covid'", "'Covid'", "'Normal'"]),  # exact names, as the reports use them
    ("Sick", BINARY, ["eval.positive_class='Sick'", "'Normal'"]),
    ("7", TEN, ["binary", "10 classes"]),
    ("Thai", MULTI, None),  # the language task is binary
    ("Lao", MULTI, ["'Lao'", "'language'", "'Thai'"]),
])
def test_positive_class_must_name_a_class_of_the_binary_tasks(positive, tasks, words):
    cfg = _cfg(positive_class=positive)
    if words is None:
        check_tasks(cfg, tasks)
        return
    with pytest.raises(TlbenchError) as e:
        check_tasks(cfg, tasks)
    for w in words:
        assert w in str(e.value)


# ----------------------------------------------------------------------------- dataset keys a dataset does not read
def _validated(**ds) -> Config:
    from tlbench.validation import validate

    return validate(Config(dataset=DatasetConfig(**ds)))


@pytest.mark.parametrize("ds, words", [
    # the walkthrough: a CIFAR-10 root without dataset=cifar10 trained on the default digits
    (dict(root="/work/shared/data/cifar10"),
     ["dataset.root='/work/shared/data/cifar10'", "dataset=sklearn_digits (the default) reads no files",
      "did you mean dataset=cifar10?", "cifar10, emnist, handwritten_digits, chest_xray, image_folder"]),
    (dict(root="/nonexistent"), ["dataset.root='/nonexistent'", "reads no files", "dataset=NAME"]),
    (dict(root="/data/Handwritten-Digits"), ["did you mean dataset=handwritten_digits?"]),
    (dict(download=True), ["dataset.download=true", "nothing to download", "cifar10, emnist"]),
    (dict(name="image_folder", root="x", download=True),
     ["dataset.download=true", "dataset=image_folder has no downloader", "cifar10, emnist"]),
    (dict(split="letters"), ["dataset.split='letters'", "no variants", "read dataset.split: emnist"]),
    (dict(name="cifar10", root="x", split="balanced"), ["dataset.split='balanced'", "dataset=cifar10 has no"]),
    (dict(name="chest_xray", root="x", split="train"), ["dataset.split='train'", "dataset=chest_xray"]),
])
def test_a_dataset_key_the_dataset_does_not_read_is_refused(ds, words):
    with pytest.raises(TlbenchError) as e:
        _validated(**ds)
    for w in words:
        assert w in str(e.value), str(e.value)


@pytest.mark.parametrize("ds", [
    dict(),
    dict(root=None, download=False, split=None),
    dict(name="cifar10", root="x", download=True),
    dict(name="emnist", root="x", download=True, split="letters"),
    *[dict(name=n, root="x") for n in ("handwritten_digits", "chest_xray", "image_folder")],
])
def test_a_dataset_key_the_dataset_reads_is_accepted(ds):
    _validated(**ds)


@pytest.mark.parametrize("name", ["sklearn_digits", "cifar10", "emnist", "handwritten_digits", "chest_xray",
                                  "image_folder"])
def test_every_dataset_group_composes_with_its_own_defaults(name):
    """conf/dataset/<name>.yaml sets every dataset key: none of them trips the check."""
    from conftest import compose_cfg

    assert compose_cfg(f"dataset={name}").dataset.name == name


# ----------------------------------------------------------------------------- a task needs 2 classes
@pytest.mark.parametrize("tasks, words", [
    ({"label": ["cat"]}, ["task 'label'", "1 class ('cat')", "at least 2"]),
    ({"label": []}, ["task 'label'", "0 classes"]),
    ({"digit": MULTI["digit"], "language": ["Thai"]}, ["task 'language'", "dataset.task=digit (10 classes)"]),
])
def test_a_task_with_fewer_than_two_classes_is_refused(tasks, words):
    with pytest.raises(TlbenchError) as e:
        check_tasks(Config(), tasks)
    for w in words:
        assert w in str(e.value), str(e.value)


def test_a_reconstruction_run_has_no_classes_and_passes():
    from tlbench.config import ModelConfig

    check_tasks(Config(model=ModelConfig(name="cae")), {"reconstruction": []})


def _one_class_data(tmp_path, kind):
    """A dataset config whose selected task has one class, on a fixture in the dataset's layout."""
    root = tmp_path / kind
    if kind == "image_folder":
        fx.write_class_tree(root, {"cat": 6, "dog": 6}, modes=("L",))
        return dict(name=kind, root=str(root), classes=("cat",))
    if kind == "chest_xray":
        fx.write_chest_xray(root)
        return dict(name=kind, root=str(root), classes=("Covid",))
    # handwritten_digits: one language left, so the language task has one class (the digit task has 10);
    # 2 images per digit: too few for a stratified multitask split, so the check must come before splitting
    fx.write_handwritten_digits(root, per_digit=2)
    return dict(name="handwritten_digits", root=str(root), classes=("Thai",), task=kind.split(":")[1])


ONE_CLASS = ["image_folder", "chest_xray", "handwritten_digits:language", "handwritten_digits:multitask"]


@pytest.mark.parametrize("kind", ONE_CLASS)
def test_every_dataset_refuses_a_one_class_task_before_training(tmp_path, kind):
    """Trained, scored 1.0 and exited 0 on handwritten_digits' language task with one language.
    build_everything (train and eval) refuses it once the tasks are known, before splitting."""
    from tlbench.build import build_everything
    from tlbench.config import TrainerConfig

    cfg = Config(dataset=DatasetConfig(**_one_class_data(tmp_path, kind)), trainer=TrainerConfig(feature_store=None))
    with pytest.raises(TlbenchError) as e:
        build_everything(cfg)
    msg = str(e.value)
    assert "1 class" in msg and "at least 2" in msg, msg
    if kind.startswith("handwritten"):
        assert "task 'language'" in msg and "dataset.classes=['Thai']" in msg and "dataset.task=digit" in msg, msg


@pytest.mark.parametrize("kind", ONE_CLASS)
def test_plan_refuses_a_one_class_task(tmp_path, kind):
    from tlbench.plan import build_plan

    with pytest.raises(TlbenchError, match="at least 2"):
        build_plan(Config(dataset=DatasetConfig(**_one_class_data(tmp_path, kind))))


def test_a_one_language_digit_task_still_trains_its_data(tmp_path):
    """dataset.classes=[Thai] with the digit task (english_to_thai's target) is fine: 10 classes."""
    from tlbench.build import build_everything
    from tlbench.config import TrainerConfig

    fx.write_handwritten_digits(tmp_path / "hw", per_digit=8)
    cfg = Config(dataset=DatasetConfig(name="handwritten_digits", root=str(tmp_path / "hw"), classes=("Thai",),
                                       task="digit"), trainer=TrainerConfig(feature_store=None))
    bundle, _, _ = build_everything(cfg)
    assert list(bundle.tasks) == ["digit"] and len(bundle.tasks["digit"]) == 10


# ----------------------------------------------------------------------------- image_folder on a pre-split tree
@pytest.mark.parametrize("splits", [("train", "test"), ("Train", "Valid"), ("train", "val", "test"), ("TRAIN",),
                                    ("training_set_is_not_a_split", "test")])
def test_image_folder_refuses_a_tree_of_split_folders(tmp_path, splits):
    """ROOT/train/<class> + ROOT/test/<class> trained a 2-class task 'test' vs 'train' without a word."""
    from tlbench.data.meta import plan_tasks

    for s in splits:
        fx.write_class_tree(tmp_path / s, {"cat": 3, "dog": 3}, modes=("L",))
    cfg = DatasetConfig(name="image_folder", root=str(tmp_path))
    if splits[0] == "training_set_is_not_a_split":  # a class folder among them: the tree is class folders
        assert plan_tasks(cfg)[0] == {"label": list(splits[::-1])}
        return
    for build in (lambda: build_data(cfg, PLAIN), lambda: plan_tasks(cfg)):  # train/eval, and plan
        with pytest.raises(TlbenchError) as e:
            build()
        msg = str(e.value)
        assert "all split names" in msg and "pre-split" in msg, msg
        assert f"dataset.root at {tmp_path / splits[0]}" in msg, msg  # its train folder, spelled as on disk
        assert "dataset=chest_xray" in msg, msg  # the loader that reads train/ + test/
        if "Valid" in splits:
            assert "'Valid' is renamed" in msg, msg  # chest_xray knows train/val/test only


def test_the_suggested_chest_xray_reads_a_split_tree_of_any_classes(tmp_path):
    """What the message offers works: chest_xray takes train/ + test/ with other class names."""
    fx.write_class_tree(tmp_path / "train", {"cat": 8, "dog": 8}, modes=("L",))
    fx.write_class_tree(tmp_path / "test", {"cat": 2, "dog": 2}, modes=("L",))
    bundle = build_data(DatasetConfig(name="chest_xray", root=str(tmp_path)), PLAIN)
    assert bundle.tasks == {"label": ["cat", "dog"]} and len(bundle.test) == 4


# ----------------------------------------------------------------------------- cosine warmup vs max_epochs
def _lrs(warmup: int, epochs: int) -> list[float]:
    """The lr of each epoch of the real cosine schedule, as a fraction of optim.lr."""
    from tlbench.config import SchedConfig
    from tlbench.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, SchedConfig(name="cosine", warmup_epochs=warmup), epochs)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("warmup, epochs", [(50, 3), (3, 3), (4, 3), (1, 1)])
def test_a_warmup_as_long_as_the_run_is_refused(warmup, epochs):
    """sched.warmup_epochs=50 with trainer.max_epochs=3 was accepted: the lr never passed 6% of optim.lr."""
    from tlbench.config import SchedConfig, TrainerConfig
    from tlbench.validation import validate

    assert max(_lrs(warmup, epochs)) < 1.0  # what the rule guards against: optim.lr is never reached
    cfg = Config(sched=SchedConfig(name="cosine", warmup_epochs=warmup), trainer=TrainerConfig(max_epochs=epochs))
    with pytest.raises(TlbenchError) as e:
        validate(cfg)
    msg = str(e.value)
    for w in (f"sched.warmup_epochs={warmup}", f"trainer.max_epochs={epochs}", f"from 0 to {epochs - 1}",
              f"{epochs / (warmup + 1):.0%} of optim.lr"):
        assert w in msg, msg


@pytest.mark.parametrize("warmup, epochs", [(0, 1), (2, 3), (1, 2), (5, 50)])
def test_a_warmup_shorter_than_the_run_is_accepted(warmup, epochs):
    from tlbench.config import SchedConfig, TrainerConfig
    from tlbench.validation import validate

    assert max(_lrs(warmup, epochs)) == pytest.approx(1.0)  # the schedule reaches optim.lr
    validate(Config(sched=SchedConfig(name="cosine", warmup_epochs=warmup), trainer=TrainerConfig(max_epochs=epochs)))


# ----------------------------------------------------------------------------- val_fraction=0
@pytest.mark.parametrize("name", ["sklearn_digits", "cifar10", "emnist", "handwritten_digits", "chest_xray",
                                  "image_folder"])
def test_val_fraction_zero_is_refused_before_loading(name):
    """It failed only after the data had loaded ("0 of 1527 items is 0"). No dataset has an
    official validation split, so 0 is refused for every one of them, from the config alone."""
    from tlbench.validation import validate

    root = None if name == "sklearn_digits" else "/nonexistent"  # never read: the config is refused first
    with pytest.raises(TlbenchError) as e:
        validate(Config(dataset=DatasetConfig(name=name, root=root, val_fraction=0.0)))
    msg = str(e.value)
    assert "dataset.val_fraction=0.0" in msg and "> 0" in msg and "best epoch" in msg, msg
    assert "dataset.val_fraction=0.15" in msg, msg


def test_val_fraction_above_zero_is_accepted():
    from tlbench.validation import validate

    validate(Config(dataset=DatasetConfig(val_fraction=0.01)))


def test_mirroring_characters_is_warned_about(cli, tmp_path):
    """dataset.augment=flip on a dataset of digits/letters: a mirrored character is another one or
    none; the run says so (a warning, not an error: a user may want it); without flips it does not."""
    code, rd = cli("dataset.augment=flip", "trainer.max_epochs=1")
    assert code == 0 and "mirrors images of dataset=sklearn_digits" in (rd / "train.log").read_text()
    code, rd = cli("trainer.max_epochs=1", run_dir=tmp_path / "plain")
    assert code == 0 and "mirrors images" not in (rd / "train.log").read_text()
