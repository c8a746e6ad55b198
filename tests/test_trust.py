"""Trust tests: the reference notebooks' bugs, each pinned by a test of the behaviour it breaks.

Each test below fails when the bug named in its docstring is reintroduced (checked by hand,
one bug at a time, see docs/guarantees.md) and passes on correct code:

1. frozen BatchNorm drifting inside a partly frozen backbone,
2. the RNG state not restored on resume (dropout, flip augmentation),
3. the test split evaluated on ``last.pt`` instead of ``best.pt``,
4. test items labelled by the test folder's own class enumeration,
5. the pretrained model's normalization dropped from the transforms (test_trust_models.py),
6. a multi-task loss that is not the sum of the task losses,
plus softmax fed to cross-entropy, and every metric recomputed from the predictions files.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # fixtures_data / conftest, whatever pytest's import mode

import fixtures_data as fx  # noqa: E402
from conftest import compose_cfg, results  # noqa: E402

# file datasets: one short CPU epoch, small images, every eval batch (predictions cover the split)
SMOKE = ("model=cnn", "trainer=smoke", "trainer.limit_eval_batches=null", "model.channels=[8,16]")


# ----------------------------------------------------------------------------- helpers
def run_cli(*overrides: str, run_dir: Path) -> int:
    from tlbench.cli import main

    try:
        return main([*overrides, f"hydra.run.dir={run_dir}", "trainer.progress=false"])
    except SystemExit as e:  # errors raised inside the Hydra task
        return e.code


def initial_state(*overrides: str) -> dict:
    """The model state a run with ``overrides`` starts from (same seed, same build)."""
    from tlbench.build import build_everything, seed_everything

    cfg = compose_cfg(*overrides)
    seed_everything(cfg.seed)
    _, model, _ = build_everything(cfg)
    return {k: v.clone() for k, v in model.state_dict().items()}


def ckpt(run_dir: Path, name: str) -> dict:
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def nll_by_hand(logits: np.ndarray, target: np.ndarray) -> np.ndarray:
    """-log_softmax(logits)[target] per row, in float64, from the definition."""
    z = logits.astype(np.float64)
    m = z.max(1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(z - m).sum(1))
    return lse - z[np.arange(len(z)), target]


def softmax_by_hand(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


# ============================================================================= 1. frozen BatchNorm
BN_CASES = {
    # overrides, the prefix of the one block that trains
    "cnn_last_block": (("freeze=last_block", "trainer.max_epochs=2", "trainer.batch_size=128"),
                       "backbone.stages.1."),
    # a frozen block *after* the trained one (its BN sees changing inputs)
    "cnn_first_block_only": (("freeze=pattern", "freeze.train=[stages.0]", "trainer.max_epochs=2",
                              "trainer.batch_size=128"), "backbone.stages.0."),
    "resnet18_last_block": (("freeze=last_block", "model=resnet18", "model.pretrained=false", "model.image_size=32",
                             "trainer.max_epochs=1", "trainer.batch_size=16", "trainer.limit_train_batches=3",
                             "trainer.limit_eval_batches=2"), "backbone.net.layer4."),
}


@pytest.mark.parametrize("case", list(BN_CASES))
def test_frozen_blocks_are_bit_equal_after_a_partly_frozen_run(cli, case):
    """Bug 1: frozen BatchNorm layers left in train mode inside a partly frozen backbone update
    their running statistics. After a run that trains one block of a BN model, every parameter
    *and buffer* (running_mean/var, num_batches_tracked) outside that block is bit-equal to the
    start, in best.pt and last.pt, while the trained block's BN statistics did move."""
    over, trainable = BN_CASES[case]
    code, run = cli(*over)
    assert code == 0
    init = initial_state(*over)
    bn_buffers = [k for k in init if k.startswith("backbone.") and "running_mean" in k]
    frozen_bn = [k for k in bn_buffers if not k.startswith(trainable)]
    assert frozen_bn and len(frozen_bn) < len(bn_buffers), "the case needs frozen and trainable BN layers"
    for name in ("best.pt", "last.pt"):
        state = ckpt(run, name)["model"]
        assert state.keys() == init.keys()
        changed = [k for k, v in state.items()
                   if k.startswith("backbone.") and not k.startswith(trainable) and not torch.equal(v, init[k])]
        assert not changed, f"{name}: frozen tensors changed during training: {changed[:6]}"
    last = ckpt(run, "last.pt")["model"]
    moved = [k for k in bn_buffers if k.startswith(trainable) and not torch.equal(last[k], init[k])]
    assert moved, "the trainable block's BatchNorm statistics never updated: the run did not train it"
    assert any(not torch.equal(last[k], init[k]) for k in init if k.startswith("heads."))


# ============================================================================= 2. exact resume
RESUME = ("trainer.max_epochs=2", "trainer.batch_size=128", "model.dropout=0.3", "dataset.augment=flip",
          "optim=sgd", "sched=cosine")


def _curve(res: dict) -> dict:
    return {"epochs": [(e["train"]["loss"], e["val"]["loss"], e["train"]["accuracy"], e["val"]["accuracy"])
                       for e in res["epochs"]],
            "val": res["val"], "test": res["test"], "best_epoch": res["best_epoch"]}


def test_resume_is_exact_with_dropout_and_flip_augmentation(cli, tmp_path):
    """Bug 2: the RNG state not restored on resume. Dropout (model.dropout) and random flips
    (dataset.augment=flip) draw random numbers every batch, so a resumed run equals the
    uninterrupted one only if the checkpoint's RNG state is restored."""
    import dataclasses

    from tlbench.engine import Interrupted
    from tlbench.run import train

    code, full = cli(*RESUME, run_dir=tmp_path / "full")
    assert code == 0
    cfg = compose_cfg(*RESUME, "trainer.progress=false")
    part = tmp_path / "part"
    with pytest.raises(Interrupted):
        train(cfg, part, stop_after=1)
    assert ckpt(part, "last.pt")["epoch"] == 1
    resumed = train(dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, resume=str(part))), part)
    assert _curve(resumed) == _curve(results(full))
    a, b = ckpt(full, "last.pt")["model"], ckpt(part, "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run ends with other weights"


# ============================================================================= 3. test on best.pt
@pytest.fixture(scope="module")
def best_is_epoch_1(tmp_path_factory):
    """A 3-epoch default run whose monitored value is forced to be best at epoch 1."""
    import tlbench.engine as engine

    run = tmp_path_factory.mktemp("best1") / "run"
    values = iter([1.0, 2.0, 3.0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(engine, "monitor_value", lambda monitor, val: next(values))
        assert run_cli("trainer.max_epochs=3", "trainer.batch_size=128", run_dir=run) == 0
    return run


def _eval(run: Path, *args: str) -> dict:
    from tlbench.cli import main

    assert main(["eval", str(run), *args]) == 0
    name = next((a.split("=", 1)[1] for a in args if a.startswith("name=")), "test")
    return json.loads((run / f"eval_{name}" / "results.json").read_text())


def test_reported_val_and_test_metrics_come_from_best_pt(best_is_epoch_1, tmp_path):
    """Bug 3: the test split evaluated on last.pt. With epoch 1 forced best (of 3), the reported
    val/test metrics and predictions must be exactly what `tlbench eval` (which loads best.pt)
    recomputes, and must differ from what last.pt gives."""
    run = best_is_epoch_1
    res = results(run)
    assert res["best_epoch"] == 1 and res["epochs_run"] == 3
    best, last = ckpt(run, "best.pt"), ckpt(run, "last.pt")
    assert best["epoch"] == 1 and last["epoch"] == 3
    assert any(not torch.equal(best["model"][k], last["model"][k]) for k in best["model"])

    again = _eval(run, "split=test")
    assert again["checkpoint_epoch"] == 1
    assert again["test"] == res["test"]
    assert (run / "eval_test" / "predictions" / "label.csv").read_bytes() == \
        (run / "predictions" / "label.csv").read_bytes()
    again_val = _eval(run, "split=val", "name=val")
    assert again_val["checkpoint_epoch"] == 1
    assert again_val.get("val", again_val.get("test")) == res["val"]  # stored under the split's name
    assert (run / "eval_val" / "predictions" / "label.csv").read_bytes() == \
        (run / "predictions" / "val" / "label.csv").read_bytes()

    # the check can tell the two checkpoints apart: last.pt's numbers are not the reported ones
    swapped = tmp_path / "swapped"
    shutil.copytree(run, swapped, ignore=shutil.ignore_patterns("eval_*"))
    shutil.copy(swapped / "checkpoints" / "last.pt", swapped / "checkpoints" / "best.pt")
    other = _eval(swapped, "split=test")
    assert other["checkpoint_epoch"] == 3
    assert other["test"]["label"]["loss"] != res["test"]["label"]["loss"]


def _ece(y, prob, bins=15) -> float:
    conf, pred = prob.max(1), prob.argmax(1)
    total = 0.0
    for lo, hi in zip(np.linspace(0, 1, bins + 1)[:-1], np.linspace(0, 1, bins + 1)[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs((pred[m] == y[m]).mean() - conf[m].mean())
    return total


RECOMPUTED = {"n", "accuracy", "top3_accuracy", "macro_precision", "macro_recall", "macro_f1",
              "weighted_precision", "weighted_recall", "weighted_f1", "per_class", "log_loss", "loss",
              "confusion_matrix", "ece", "sensitivity", "specificity", "roc_auc", "pr_auc", "positive_class"}


def check_metrics_recompute(m: dict, rows: list[dict], names: list[str], positive: int | None = None) -> None:
    """Every metric in ``m`` recomputed from the prediction rows with scikit-learn and numpy,
    independently of tlbench.metrics."""
    from sklearn import metrics as skm

    assert set(m) <= RECOMPUTED, f"metrics without a recompute check here: {set(m) - RECOMPUTED}"
    y = np.array([int(r["target"]) for r in rows])
    p = np.array([int(r["pred"]) for r in rows])
    prob = np.array([[float(r[f"prob_{k}"]) for k in range(len(names))] for r in rows])
    np.testing.assert_array_equal(p, prob.argmax(1))
    labels = list(range(len(names)))
    assert m["n"] == len(rows)
    assert m["accuracy"] == pytest.approx(np.mean(y == p), abs=1e-12)
    if len(names) > 3:
        top3 = np.argsort(-prob, 1)[:, :3]
        assert m["top3_accuracy"] == pytest.approx(np.mean([t in row for t, row in zip(y, top3)]), abs=1e-12)
    for avg in ("macro", "weighted"):
        pr, rc, f1, _ = skm.precision_recall_fscore_support(y, p, labels=labels, average=avg, zero_division=0)
        assert (m[f"{avg}_precision"], m[f"{avg}_recall"], m[f"{avg}_f1"]) == pytest.approx((pr, rc, f1), abs=1e-12)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)
    for i, name in enumerate(names):
        assert m["per_class"][name] == pytest.approx(
            {"precision": pr[i], "recall": rc[i], "f1": f1[i], "support": sup[i]}, abs=1e-12)
    assert m["confusion_matrix"] == skm.confusion_matrix(y, p, labels=labels).tolist()
    nll = -np.log(np.clip(prob[np.arange(len(y)), y], 1e-15, 1))
    assert m["log_loss"] == pytest.approx(nll.mean(), rel=1e-5) and m["loss"] == m["log_loss"]
    assert m["ece"] == pytest.approx(_ece(y, prob), abs=1e-5)
    if positive is not None:
        assert m["positive_class"] == names[positive]
        yt, pt = y == positive, p == positive
        assert m["sensitivity"] == pytest.approx((yt & pt).sum() / max(yt.sum(), 1), abs=1e-12)
        assert m["specificity"] == pytest.approx((~yt & ~pt).sum() / max((~yt).sum(), 1), abs=1e-12)
        if len(set(y.tolist())) == 2:
            assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(yt, prob[:, positive]), abs=1e-6)
            assert m["pr_auc"] == pytest.approx(skm.average_precision_score(yt, prob[:, positive]), abs=1e-6)


@pytest.mark.parametrize("split", ["test", "val"])
def test_every_reported_metric_recomputes_from_the_predictions_file(best_is_epoch_1, split):
    """README: every metric in results.json is recomputable from the predictions file, and
    ``target`` is the true label of dataset item ``index`` (a 10-class run)."""
    from sklearn.datasets import load_digits

    run = best_is_epoch_1
    res = results(run)
    rows = read_rows(run / "predictions" / ("label.csv" if split == "test" else "val/label.csv"))
    idx = np.array([int(r["index"]) for r in rows])
    assert sorted(idx.tolist()) == sorted(json.loads((run / "splits.json").read_text())[split])
    np.testing.assert_array_equal([int(r["target"]) for r in rows], load_digits().target[idx])
    check_metrics_recompute(res[split]["label"], rows, res["tasks"]["label"])


def test_binary_metrics_recompute_from_the_predictions_file(cli, tmp_path):
    """The same for a binary task with eval.positive_class: sensitivity, specificity, ROC-AUC and
    PR-AUC recomputed from the predictions file, for the chosen positive class."""
    root = tmp_path / "xray"
    fx.write_chest_xray(root, train={"Covid": 8, "Normal": 8}, test={"Covid": 4, "Normal": 4})
    code, run = cli("dataset=chest_xray", f"dataset.root={root}", "dataset.val_fraction=0.25",
                    "eval.positive_class=Covid", *SMOKE)
    assert code == 0
    res = results(run)
    names = res["tasks"]["label"]
    assert names == ["Covid", "Normal"]
    for split, rel in (("test", "label.csv"), ("val", "val/label.csv")):
        rows = read_rows(run / "predictions" / rel)
        assert all(r["target_name"] == Path(r["path"]).parts[1] for r in rows)
        check_metrics_recompute(res[split]["label"], rows, names, positive=0)


# ============================================================================= 4. class indices
TRAIN_CLASSES = {"Covid": 4, "Normal": 4, "Viral_Pneumonia": 4}
FOLDER_CASES = {
    # test/ folders, val/ folders (join train), dataset.classes
    "test_lacks_a_class_other_case": ({"normal": 2, "viral_pneumonia": 2}, {"NORMAL": 1, "covid": 1}, None),
    "test_case_changes_sort_order": ({"covid": 2, "Normal": 2, "viral_pneumonia": 2}, None, None),
    "classes_subset": ({"covid": 2, "Normal": 2, "VIRAL_PNEUMONIA": 2}, None, ("viral_pneumonia", "Covid")),
}


def _write_split_tree(root: Path, case: str) -> list[str]:
    """train/ + test/ (+ val/) class folders whose images encode their class's *train* index;
    returns the expected class names (train folder names, sorted, after dataset.classes)."""
    test, val, classes = FOLDER_CASES[case]
    names = sorted(n for n in TRAIN_CLASSES if classes is None or n.casefold() in {c.casefold() for c in classes})
    canon = {n.casefold(): n for n in TRAIN_CLASSES}
    for part, counts in (("train", TRAIN_CLASSES), ("test", test), ("val", val or {})):
        for folder, n in counts.items():
            name = canon[folder.casefold()]
            label = names.index(name) if name in names else 20
            for k in range(n):
                fx.write_image(root / part / folder / f"{part}_{k}.png", label, mode="L", size=(16, 16))
    return names


def _train_index(relpath: str, names: list[str]) -> int:
    """The label an item must have: its class folder's index among the train class names."""
    folder = Path(relpath).parts[1]
    return [n.casefold() for n in names].index(folder.casefold())


def _pixel(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return fx.decode_label(im.convert("L").getpixel((8, 8)))


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_loader_labels_every_item_by_its_train_class_index(tmp_path, case):
    """Bug 4 (loader level): test/ (and val/) items labelled by their own folder's enumeration.
    Every item's label must be the train index of its class, whatever test/ lacks or how it
    spells or orders its folders."""
    from tlbench.config import DatasetConfig
    from tlbench.data import folders

    names = _write_split_tree(tmp_path, case)
    classes = FOLDER_CASES[case][2]
    src = folders.load_chest_xray(DatasetConfig(name="chest_xray", root=str(tmp_path), classes=classes))
    assert src.tasks == {"label": names}
    test = set(src.official_test.tolist())
    assert test == {i for i, r in enumerate(src.relpaths) if r.startswith("test/")} and test
    for i, rel in enumerate(src.relpaths):
        assert src.labels["label"][i] == _train_index(rel, names) == _pixel(tmp_path / rel), rel


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_run_predictions_use_train_class_indices(cli, tmp_path, case):
    """Bug 4 (end to end): in a run on train/ + test/ folders that differ in class set, order or
    case, every prediction row's target is its class's train index (from the path and from the
    pixels) and its name the train folder's name, for the test and the validation split."""
    root = tmp_path / "xray"
    names = _write_split_tree(root, case)
    classes = FOLDER_CASES[case][2]
    sel = (f"dataset.classes=[{','.join(classes)}]",) if classes else ()
    code, run = cli("dataset=chest_xray", f"dataset.root={root}", "dataset.val_fraction=0.25", *sel, *SMOKE)
    assert code == 0
    res = results(run)
    assert res["tasks"] == {"label": names}
    test_rows = read_rows(run / "predictions" / "label.csv")
    assert test_rows and all(r["path"].startswith("test/") for r in test_rows)
    assert len(test_rows) == sum(n for f, n in FOLDER_CASES[case][0].items()
                                 if f.casefold() in {c.casefold() for c in names})
    for r in test_rows + read_rows(run / "predictions" / "val" / "label.csv"):
        t = int(r["target"])
        assert t == _train_index(r["path"], names) == _pixel(root / r["path"]), r
        assert r["target_name"] == names[t]


# ============================================================================= 6. multi-task loss
class _TwoHeads(nn.Module):
    """Fixed features, one linear head per task: ``{task: logits}`` like TLModel."""

    def __init__(self, feats: torch.Tensor, sizes: dict[str, int]):
        super().__init__()
        self.feats = feats
        torch.manual_seed(0)
        self.heads = nn.ModuleDict({t: nn.Linear(feats.shape[1], k) for t, k in sizes.items()})

    def forward(self, x):
        return {t: h(self.feats) for t, h in self.heads.items()}


def test_multitask_loss_is_the_sum_and_every_head_gets_its_own_gradient():
    """Bug 6 (unit): a multi-task loss other than the sum of the tasks' cross-entropies (e.g. the
    first task only: the other heads never train). One SGD step of the real loop must move every
    head by exactly -lr * d(its own CE)/d(its weights), and report loss = sum of task losses."""
    from tlbench.engine import LoopOptions, run_epoch

    g = torch.Generator().manual_seed(1)
    feats = torch.randn(6, 4, generator=g)
    y = {"digit": torch.tensor([0, 3, 9, 3, 1, 7]), "language": torch.tensor([1, 0, 0, 1, 1, 0])}
    model = _TwoHeads(feats, {"digit": 10, "language": 2})
    before = {t: (h.weight.detach().double().clone(), h.bias.detach().double().clone())
              for t, h in model.heads.items()}
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    res = run_epoch(model, [(torch.zeros(6, 1), y)], ["digit", "language"], LoopOptions(device=torch.device("cpu")),
                    optimizer=opt)
    x = feats.double().numpy()
    total = 0.0
    for t, (w, b) in before.items():
        logits = x @ w.numpy().T + b.numpy()
        target = y[t].numpy()
        ce = nll_by_hand(logits, target).mean()
        assert res.task_loss[t] == pytest.approx(ce, rel=1e-6)
        total += ce
        grad = softmax_by_hand(logits)
        grad[np.arange(len(target)), target] -= 1
        grad /= len(target)
        head = model.heads[t]
        np.testing.assert_allclose(head.weight.detach().double().numpy(), w.numpy() - lr * grad.T @ x, atol=1e-6)
        np.testing.assert_allclose(head.bias.detach().double().numpy(), b.numpy() - lr * grad.sum(0), atol=1e-6)
    assert res.loss == pytest.approx(total, rel=1e-6)


def test_multitask_run_trains_every_head(cli, tmp_path):
    """Bug 6 (end to end): dataset.task=multitask on handwritten_digits. Every parameter of
    every task's head changed, and each epoch's total loss is the sum of its task losses."""
    root = tmp_path / "digits"
    fx.write_handwritten_digits(root, languages=("English", "Thai"), per_digit=4)
    over = ("dataset=handwritten_digits", f"dataset.root={root}", "dataset.task=multitask",
            "dataset.val_fraction=0.25", "dataset.test_fraction=0.25", *SMOKE)
    code, run = cli(*over)
    assert code == 0
    res = results(run)
    assert set(res["tasks"]) == {"digit", "language"}
    init = initial_state(*over)
    last = ckpt(run, "last.pt")["model"]
    heads = [k for k in init if k.startswith("heads.")]
    for task in ("digit", "language"):
        mine = [k for k in heads if k.startswith(f"heads.{task}.")]
        assert mine and all(not torch.equal(last[k], init[k]) for k in mine), f"the {task} head did not train"
    for e in res["epochs"]:
        for split in ("train", "val"):
            parts = e[split]["task_loss"]
            assert set(parts) == {"digit", "language"}
            assert e[split]["loss"] == pytest.approx(sum(parts.values()), rel=1e-6)


# ============================================================================= softmax vs logits
def _logits(b=8, k=5, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, k, generator=g) * scale, torch.randint(0, k, (b,), generator=g)


def test_loss_is_cross_entropy_on_logits():
    """Softmax fed to cross-entropy: the loss on fixed logits equals mean -log_softmax(logits)[y]
    (by hand, float64); a distilled (cls, dist) pair gives the mean of the two; class weights give
    the weighted mean."""
    from tlbench.objectives import task_loss

    logits, y = _logits()
    want = nll_by_hand(logits.numpy(), y.numpy()).mean()
    assert float(task_loss(logits, y, None)) == pytest.approx(want, rel=1e-6)
    dist, _ = _logits(seed=1)
    pair = float(task_loss(torch.stack([logits, dist]), y, None))
    want_dist = nll_by_hand(dist.numpy(), y.numpy()).mean()
    assert pair == pytest.approx((want + want_dist) / 2, rel=1e-6)
    w = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5])
    nll = nll_by_hand(logits.numpy(), y.numpy())
    wy = w.numpy()[y.numpy()]
    assert float(task_loss(logits, y, w)) == pytest.approx((wy * nll).sum() / wy.sum(), rel=1e-6)


class _Fixed(nn.Module):
    def __init__(self, out: dict):
        super().__init__()
        self.out = out

    def forward(self, x):
        return dict(self.out)


def test_loop_loss_and_probabilities_come_from_the_logits():
    """Softmax fed to cross-entropy, in the loop: evaluating a model with fixed logits reports
    loss = mean -log_softmax(logits)[y] and probabilities = softmax(logits), predictions = argmax."""
    from tlbench.engine import LoopOptions, run_epoch

    a, ya = _logits(seed=2)
    b, yb = _logits(seed=3, k=3)
    res = run_epoch(_Fixed({"a": a, "b": b}), [(torch.zeros(8, 1), {"a": ya, "b": yb})], ["a", "b"],
                    LoopOptions(device=torch.device("cpu")), collect=True)
    ce_a, ce_b = nll_by_hand(a.numpy(), ya.numpy()).mean(), nll_by_hand(b.numpy(), yb.numpy()).mean()
    assert res.task_loss["a"] == pytest.approx(ce_a, rel=1e-6)
    assert res.task_loss["b"] == pytest.approx(ce_b, rel=1e-6)
    assert res.loss == pytest.approx(ce_a + ce_b, rel=1e-6)
    np.testing.assert_allclose(res.collected["a"]["probs"], softmax_by_hand(a.numpy()), atol=1e-6)
    np.testing.assert_array_equal(res.collected["a"]["preds"], a.argmax(1).numpy())


def test_model_returns_logits_and_distilled_pair_is_averaged_in_eval():
    """TLModel's output is the head's raw output (logits, no softmax); a distilled backbone gives
    the stacked (cls, dist) pair in training and the mean of the two in eval."""
    from tlbench.objectives import task_loss
    from tlbench.models.base import Backbone, InputSpec, TLModel

    class Tiny(Backbone):
        def __init__(self, distilled: bool):
            super().__init__()
            self.lin = nn.Linear(4, 6)
            self.feature_dim, self.input_spec = 6, InputSpec(size=2)
            self.num_feature_outputs = 2 if distilled else 1

        def forward(self, x):
            f = self.lin(x.flatten(1))
            return (f, -f) if self.num_feature_outputs == 2 else f

        def blocks(self):
            return OrderedDict(lin=self.lin)

    torch.manual_seed(0)
    x = torch.randn(5, 1, 2, 2) * 3
    model = TLModel(Tiny(False), {"label": 4}).eval()
    with torch.no_grad():
        out = model(x)["label"]
        assert torch.equal(out, model.heads["label"](model.backbone(x)))
    assert not torch.allclose(out.sum(1), torch.ones(5)) and (out < 0).any()  # logits, not probabilities
    model = TLModel(Tiny(True), {"label": 4})
    with torch.no_grad():
        cls_f, dist_f = model.backbone(x)
        a, b = model.heads["label"](cls_f), model.heads_dist["label"](dist_f)
        model.train()
        pair = model(x)["label"]
        assert torch.equal(pair, torch.stack([a, b]))
        model.eval()
        assert torch.allclose(model(x)["label"], (a + b) / 2)
    y = torch.tensor([0, 1, 2, 3, 0])
    want = (nll_by_hand(a.numpy(), y.numpy()).mean() + nll_by_hand(b.numpy(), y.numpy()).mean()) / 2
    assert float(task_loss(pair, y, None)) == pytest.approx(want, rel=1e-6)
