"""End-to-end: the real ``tlbench`` CLI on tiny datasets written in each official format.

Each test writes a dataset with ``fixtures_data`` (so the true label of every item is
known independently of tlbench), trains a scratch CNN for one short epoch through the
CLI and checks the run directory: the file contract, accuracies recomputed from the
predictions files, and every prediction's ``target`` against the label the fixture
wrote (for file datasets also the ``path`` column and the image's pixels).
``realdata`` tests do one smoke run per dataset on ``../shared/data``.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # fixtures_data / conftest, whatever pytest's import mode

import fixtures_data as fx  # noqa: E402
from conftest import shared_data  # noqa: E402

# one short CPU epoch, small images, every eval batch (predictions must cover the whole test split)
SMOKE = ("model=cnn", "trainer=smoke", "trainer.limit_eval_batches=null", "model.channels=[8,16]")
CHEST = {"Covid": 6, "Normal": 6, "Viral_Pneumonia": 3}
CHEST_TEST = {"Covid": 2, "Normal": 2, "Viral_Pneumonia": 1}


# ----------------------------------------------------------------------------- helpers
def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_run_dir(run_dir: Path, tasks: list[str]) -> tuple[dict, dict[str, list[dict]]]:
    """The run-dir contract for ``tasks``; returns (results, {task: prediction rows})."""
    for rel in ("results.json", "splits.json", "config_hash", "train.log", ".hydra/config.yaml",
                "checkpoints/best.pt", "checkpoints/last.pt"):
        assert (run_dir / rel).is_file(), f"missing {rel}"
    assert list((run_dir / "tb").rglob("events.out.tfevents*")), "no TensorBoard events under tb/"
    assert "epoch 1/" in (run_dir / "train.log").read_text(), "train.log does not log the epochs"
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("params", "val", "test", "epochs", "config_hash", "dataset_fingerprint", "best_epoch"):
        assert key in res, f"results.json lacks {key!r}"
    assert res["config_hash"] == (run_dir / "config_hash").read_text().strip()
    assert res["params"]["trainable"] > 0 and res["params"]["total"] >= res["params"]["trainable"]
    assert len(res["epochs"]) >= 1 and "val" in res["epochs"][0] and "train" in res["epochs"][0]
    assert sorted(res["test"]) == sorted(tasks) and sorted(res["val"]) == sorted(tasks)
    splits = json.loads((run_dir / "splits.json").read_text())
    parts = [set(splits[s]) for s in ("train", "val", "test")]
    assert all(parts), f"an empty split: {[len(p) for p in parts]}"
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), "splits overlap"
    preds = {}
    for task in tasks:
        for rel in (f"figures/confusion_{task}.png", f"classification_report_{task}.txt"):
            assert (run_dir / rel).is_file() and (run_dir / rel).stat().st_size > 0, f"missing {rel}"
        with Image.open(run_dir / "figures" / f"confusion_{task}.png") as im:
            assert im.format == "PNG"
        rows = read_rows(run_dir / "predictions" / f"{task}.csv")
        names = res["tasks"][task]
        assert rows and {"index", "target", "pred", "target_name", "pred_name"} <= set(rows[0])
        assert [f"prob_{k}" for k in range(len(names))] == [c for c in rows[0] if c.startswith("prob_")]
        # the whole test split, each item once
        assert sorted(int(r["index"]) for r in rows) == sorted(splits["test"])
        for r in rows:
            assert r["target_name"] == names[int(r["target"])] and r["pred_name"] == names[int(r["pred"])]
            probs = [float(r[f"prob_{k}"]) for k in range(len(names))]
            assert abs(sum(probs) - 1) < 1e-4 and int(r["pred"]) == int(np.argmax(probs))
        acc = np.mean([r["target"] == r["pred"] for r in rows])
        assert res["test"][task]["accuracy"] == pytest.approx(acc, abs=1e-9)
        assert res["test"][task]["n"] == len(rows)
        preds[task] = rows
    return res, preds


def pixel_label(path: Path) -> int:
    """The label a file fixture image encodes in its central block."""
    with Image.open(path) as im:
        g = im.convert("L")
        return fx.decode_label(g.getpixel((g.width // 2, g.height // 2)))


def assert_failed(code: int, run_dir: Path, capsys, *needles: str) -> str:
    """Exit code 2, one ``tlbench: error:`` paragraph naming the problem, no results."""
    err = capsys.readouterr().err
    assert code == 2, err
    assert "tlbench: error:" in err and "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in: {err}"
    assert not (run_dir / "results.json").exists() and not (run_dir / "predictions").exists()
    assert not (run_dir / "checkpoints").exists()
    return err


# ----------------------------------------------------------------------------- CIFAR-10
def test_cifar10_e2e(cli, tmp_path):
    labels = fx.write_cifar10(tmp_path / "data", per_batch=8, n_test=10)  # 40 train + 10 test
    code, rd = cli("dataset=cifar10", f"dataset.root={tmp_path / 'data'}", "dataset.val_fraction=0.25", *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["label"])
    assert res["tasks"]["label"] == fx.CIFAR_NAMES
    splits = json.loads((rd / "splits.json").read_text())
    assert splits["test"] == list(range(40, 50))  # the official test_batch, nothing else
    assert len(splits["train"]) + len(splits["val"]) == 40
    for r in preds["label"]:
        true = int(labels[int(r["index"])])
        assert int(r["target"]) == true and r["target_name"] == fx.CIFAR_NAMES[true]


# ----------------------------------------------------------------------------- EMNIST
def test_emnist_balanced_e2e(cli, tmp_path):
    labels = fx.write_emnist(tmp_path / "data", "balanced", n_train=4 * 47, n_test=47, gz=True)
    code, rd = cli("dataset=emnist", f"dataset.root={tmp_path / 'data'}", "dataset.split=balanced",
                   "dataset.val_fraction=0.25", *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["label"])
    assert "".join(res["tasks"]["label"]) == fx.BALANCED
    splits = json.loads((rd / "splits.json").read_text())
    assert splits["test"] == list(range(4 * 47, 5 * 47))
    for r in preds["label"]:
        true = int(labels[int(r["index"])])
        assert int(r["target"]) == true and r["target_name"] == fx.BALANCED[true]


# ----------------------------------------------------------------------------- handwritten digits
def _digits(tmp_path: Path) -> Path:
    root = tmp_path / "digits"
    fx.write_handwritten_digits(root, languages=("English", "Thai"), per_digit=4)  # 80 images
    return root


DIGIT_SPLIT = ("dataset.val_fraction=0.25", "dataset.test_fraction=0.25")


def _check_digit_rows(rows: list[dict], root: Path) -> None:
    for r in rows:
        language, digit, _ = Path(r["path"]).parts
        assert int(r["target"]) == int(digit) == pixel_label(root / r["path"]) and r["target_name"] == digit


def _check_language_rows(rows: list[dict]) -> None:
    for r in rows:
        language = Path(r["path"]).parts[0]
        assert r["target_name"] == language and int(r["target"]) == ["English", "Thai"].index(language)
    assert {r["target_name"] for r in rows} == {"English", "Thai"}


def test_handwritten_digits_digit_e2e(cli, tmp_path):
    root = _digits(tmp_path)
    code, rd = cli("dataset=handwritten_digits", f"dataset.root={root}", "dataset.task=digit", *DIGIT_SPLIT, *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["digit"])
    assert res["tasks"] == {"digit": [str(d) for d in range(10)]}
    _check_digit_rows(preds["digit"], root)


def test_handwritten_digits_language_e2e(cli, tmp_path):
    root = _digits(tmp_path)
    code, rd = cli("dataset=handwritten_digits", f"dataset.root={root}", "dataset.task=language", *DIGIT_SPLIT,
                   *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["language"])
    assert res["tasks"] == {"language": ["English", "Thai"]}
    _check_language_rows(preds["language"])


def test_handwritten_digits_multitask_e2e(cli, tmp_path):
    root = _digits(tmp_path)
    code, rd = cli("dataset=handwritten_digits", f"dataset.root={root}", "dataset.task=multitask", *DIGIT_SPLIT,
                   *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["digit", "language"])
    assert res["tasks"] == {"digit": [str(d) for d in range(10)], "language": ["English", "Thai"]}
    for split in ("val", "test"):  # each task reported on its own
        assert set(res[split]) == {"digit", "language"}
    assert set(res["epochs"][-1]["val"]["accuracy"]) == {"digit", "language"}
    _check_digit_rows(preds["digit"], root)
    _check_language_rows(preds["language"])
    digit = {r["index"]: r for r in preds["digit"]}
    lang = {r["index"]: r for r in preds["language"]}
    assert digit.keys() == lang.keys()
    assert all(digit[i]["path"] == lang[i]["path"] for i in digit)
    # language targets come from language labels, not the digit labels
    assert sum(digit[i]["target"] != lang[i]["target"] for i in digit) > len(digit) // 2
    # stratified on (digit, language): every combination is in the test split once
    assert sorted((int(digit[i]["target"]), lang[i]["target_name"]) for i in digit) == sorted(
        (d, lg) for d in range(10) for lg in ("English", "Thai"))


# ----------------------------------------------------------------------------- chest X-ray
def test_chest_xray_train_test_folders_with_classes_e2e(cli, tmp_path):
    root = tmp_path / "xray"
    fx.write_chest_xray(root, train=CHEST, test=CHEST_TEST)
    code, rd = cli("dataset=chest_xray", f"dataset.root={root}", "dataset.classes=[Covid,Normal]",
                   "dataset.val_fraction=0.34", *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["label"])
    assert res["tasks"] == {"label": ["Covid", "Normal"]}
    rows = preds["label"]
    assert len(rows) == CHEST_TEST["Covid"] + CHEST_TEST["Normal"]  # the test/ folder, selected classes
    fixture_names = sorted(CHEST)
    for r in rows:
        split, cls, _ = Path(r["path"]).parts
        assert split == "test" and r["target_name"] == cls
        assert int(r["target"]) == ["Covid", "Normal"].index(cls)
        assert fixture_names[pixel_label(root / r["path"])] == cls
    counts = res["class_counts"]
    assert sum(counts["train"]["label"].values()) + sum(counts["val"]["label"].values()) == 12


# ----------------------------------------------------------------------------- image folder
def test_image_folder_e2e(cli, tmp_path):
    root = tmp_path / "pets"
    counts = {"cat": 8, "dog": 8, "fish": 8}
    fx.write_class_tree(root, counts)  # mixed RGB/L/RGBA/P, png + jpg, mixed sizes
    code, rd = cli("dataset=image_folder", f"dataset.root={root}", "dataset.val_fraction=0.25",
                   "dataset.test_fraction=0.25", *SMOKE)
    assert code == 0
    res, preds = check_run_dir(rd, ["label"])
    assert res["tasks"] == {"label": ["cat", "dog", "fish"]}
    rows = preds["label"]
    assert {r["target_name"] for r in rows} == set(counts)
    for r in rows:
        cls = Path(r["path"]).parts[0]
        assert r["target_name"] == cls and int(r["target"]) == sorted(counts).index(cls)
        assert pixel_label(root / r["path"]) == int(r["target"])


# ----------------------------------------------------------------------------- bad input via the CLI
def test_cli_missing_root(cli, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    code, rd = cli("dataset=image_folder", f"dataset.root={missing}", *SMOKE)
    assert_failed(code, rd, capsys, str(missing), "does not exist")


def test_cli_corrupt_image(cli, tmp_path, capsys):
    root = tmp_path / "pets"
    fx.write_class_tree(root, {"cat": 4, "dog": 4})
    fx.write_corrupt(root / "dog" / "broken.png")
    code, rd = cli("dataset=image_folder", f"dataset.root={root}", "dataset.on_bad_image=error", *SMOKE)
    assert_failed(code, rd, capsys, "broken.png", "dataset.on_bad_image=skip")


def test_cli_mixed_image_sizes_without_image_size(cli, tmp_path, capsys):
    root = tmp_path / "pets"
    fx.write_class_tree(root, {"cat": 6, "dog": 6})  # sizes differ per file
    code, rd = cli("dataset=image_folder", f"dataset.root={root}", "model=cnn", "trainer.max_epochs=1",
                   "trainer.device=cpu", "trainer.limit_train_batches=1", "dataset.val_fraction=0.25",
                   "dataset.test_fraction=0.25")
    err = capsys.readouterr().err
    assert code == 0, err[-2000:]  # native-size models get one fixed size for file datasets


def test_cli_unknown_emnist_split(cli, tmp_path, capsys):
    fx.write_emnist(tmp_path / "data", "balanced")
    code, rd = cli("dataset=emnist", f"dataset.root={tmp_path / 'data'}", "dataset.split=balancd", *SMOKE)
    assert_failed(code, rd, capsys, "'balancd'", "'balanced'", "'byclass'")


def test_cli_emnist_split_files_absent(cli, tmp_path, capsys):
    fx.write_emnist(tmp_path / "data", "balanced")
    code, rd = cli("dataset=emnist", f"dataset.root={tmp_path / 'data'}", "dataset.split=letters", *SMOKE)
    assert_failed(code, rd, capsys, "emnist-letters-train-images-idx3-ubyte", "'balanced'")


def test_cli_classes_names_a_missing_class(cli, tmp_path, capsys):
    root = tmp_path / "xray"
    fx.write_chest_xray(root, train=CHEST, test=CHEST_TEST)
    code, rd = cli("dataset=chest_xray", f"dataset.root={root}", "dataset.classes=[Covid,Pneumonia]", *SMOKE)
    err = assert_failed(code, rd, capsys, "'Pneumonia'", "'Viral_Pneumonia'", "'Normal'")
    assert "dataset.classes" in err


# ----------------------------------------------------------------------------- real shared data
REAL = [
    # (id, folder under shared data, overrides, tasks, truth from the path: None | "class" | "lang_digit")
    ("cifar10", "cifar10", ["dataset=cifar10", "dataset.limit_per_class=30"], ["label"], None),
    ("emnist", "emnist", ["dataset=emnist", "dataset.split=balanced", "dataset.limit_per_class=20"], ["label"], None),
    ("handwritten_digits", "handwritten_digits",
     ["dataset=handwritten_digits", "dataset.task=multitask", "dataset.limit_per_class=10"],
     ["digit", "language"], "lang_digit"),
    ("chest_xray", "chest_xray", ["dataset=chest_xray"], ["label"], "class"),
    ("image_folder", "handwritten_digits/English", ["dataset=image_folder", "dataset.limit_per_class=20"],
     ["label"], "class"),
]


@pytest.mark.realdata
@pytest.mark.parametrize("name,folder,overrides,tasks,truth", REAL, ids=[r[0] for r in REAL])
def test_real_smoke_run(cli, name, folder, overrides, tasks, truth):
    root = shared_data() / folder
    if not root.is_dir():
        pytest.skip(f"shared data {root} not present (set TLBENCH_SHARED_DATA)")
    code, rd = cli(*overrides, f"dataset.root={root}", "model=cnn", "trainer=smoke", "trainer.limit_eval_batches=null")
    assert code == 0
    res, preds = check_run_dir(rd, tasks)
    if truth is None:
        return
    for task, rows in preds.items():
        for r in rows:
            parts = Path(r["path"]).parts
            if truth == "class":
                expected = parts[-2]
            else:
                expected = parts[-2] if task == "digit" else parts[-3]
            assert r["target_name"] == expected, r


def test_eval_on_another_root_with_the_same_classes(cli, tmp_path, capsys):
    """`tlbench eval RUN_DIR dataset.root=OTHER split=all`: a held-out folder, every image scored."""
    import csv
    import json

    from tlbench.cli import main

    train_root, held_out = tmp_path / "train", tmp_path / "held_out"
    fx.write_class_tree(train_root, {"cat": 8, "dog": 8})
    fx.write_class_tree(held_out, {"cat": 3, "dog": 5})
    code, run = cli("dataset=image_folder", f"dataset.root={train_root}", "model.image_size=16",
                    "trainer.max_epochs=1", "dataset.val_fraction=0.25", "dataset.test_fraction=0.25")
    assert code == 0
    assert main(["eval", str(run), f"dataset.root={held_out}", "split=all", "name=held_out"]) == 0
    out = run / "eval_held_out"
    rows = list(csv.DictReader(open(out / "predictions" / "label.csv")))
    assert len(rows) == 8
    assert all(r["path"].split("/")[0] == r["target_name"] for r in rows)
    res = json.loads((out / "results.json").read_text())
    acc = sum(r["target"] == r["pred"] for r in rows) / len(rows)
    assert res["split"] == "all" and res["all"]["label"]["accuracy"] == acc
    assert json.loads((run / "results.json").read_text())["test"]["label"]["n"] == 4  # the run's own test untouched
    # split=val re-scores the best checkpoint on the run's own validation split: the metrics are
    # stored under "val" and equal what the run reported for validation
    capsys.readouterr()
    assert main(["eval", str(run), "split=val"]) == 0
    res = json.loads((run / "eval_val" / "results.json").read_text())
    printed = capsys.readouterr().out  # tlbench eval prints the metrics it wrote
    assert "val metrics of" in printed and f"accuracy {res['val']['label']['accuracy']:.4f}" in printed
    assert "test" not in res and res["split"] == "val"
    own = json.loads((run / "results.json").read_text())["val"]["label"]
    assert res["val"]["label"]["accuracy"] == own["accuracy"]
    assert res["val"]["label"]["loss"] == pytest.approx(own["loss"], rel=1e-6)
    other = tmp_path / "other_classes"
    fx.write_class_tree(other, {"bird": 3, "fish": 3})
    assert main(["eval", str(run), f"dataset.root={other}", "split=all"]) == 2
