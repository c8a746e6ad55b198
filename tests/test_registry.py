"""One registry per axis (issue #11): conf/ and the code agree on every name a user can choose."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from tlbench import config, registry
from tlbench.freeze import POLICIES
from tlbench.models import SCRATCH
from tlbench.models.backbones import BACKBONE_NAMES

CONF = Path(__file__).resolve().parents[1] / "conf"


def _stems(group: str) -> set[str]:
    return {p.stem for p in (CONF / group).glob("*.yaml")}


def test_every_dataset_config_has_an_entry_and_every_entry_a_config():
    assert _stems("dataset") == set(registry.DATASETS) == set(config.DATASETS)


@pytest.mark.parametrize("name", sorted(registry.DATASETS))
def test_every_dataset_entry_names_functions_that_exist(name):
    entry = registry.DATASETS[name]
    module = importlib.import_module(f"tlbench.data.{entry.module}")
    assert callable(getattr(module, entry.load)) and callable(getattr(module, entry.meta))
    assert (name in config.FOLDER_DATASETS) == entry.folders


def test_every_model_config_has_an_entry_and_every_entry_a_config():
    assert _stems("model") == set(registry.MODELS)
    assert set(SCRATCH) | set(BACKBONE_NAMES) == set(registry.MODELS)
    assert config.RECONSTRUCTION_MODELS == ("cae",)


def test_every_freeze_config_is_a_policy():
    assert _stems("freeze") == set(POLICIES)
