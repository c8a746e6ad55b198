"""Dataset loaders against tiny fixtures written in each official format, plus the shared real data."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))  # fixtures_data, whatever pytest's import mode

import fixtures_data as fx  # noqa: E402
from tlbench.config import DatasetConfig  # noqa: E402
from tlbench.data import cifar10, emnist, folders  # noqa: E402
from tlbench.errors import TlbenchError  # noqa: E402


def cfg(name: str, root, **kw) -> DatasetConfig:
    return DatasetConfig(name=name, root=None if root is None else str(root), **kw)


def file_labels(src) -> list[int]:
    """The label each file image encodes in its central pixel (after alpha flattening)."""
    out = []
    for i in range(len(src)):
        im = src.image(i).convert("L")
        out.append(fx.decode_label(im.getpixel((im.width // 2, im.height // 2))))
    return out


# ----------------------------------------------------------------------------- CIFAR-10
def test_cifar10_fixture_matches_official_pickles(tmp_path):
    fx.write_cifar10(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    assert set(batch) == {b"data", b"labels", b"batch_label", b"filenames"}
    assert batch[b"data"].shape == (4, 3072) and batch[b"data"].dtype == np.uint8


def test_cifar10_loads_images_labels_and_test_split(tmp_path, caplog):
    labels = fx.write_cifar10(tmp_path, per_batch=4, n_test=6)
    with caplog.at_level(logging.WARNING):
        src = cifar10.load(cfg("cifar10", tmp_path))
    assert "md5 checksum check skipped" in caplog.text
    assert src.tasks == {"label": fx.CIFAR_NAMES} and src.default_task == "label"
    assert src.images.shape == (26, 32, 32, 3) and src.images.dtype == np.uint8
    np.testing.assert_array_equal(src.labels["label"], labels)
    np.testing.assert_array_equal(src.images[:, 5, 5, 0], labels * 20)  # label pixel, red channel
    np.testing.assert_array_equal(src.images[:, 5, 5, 1], np.arange(26))  # train then test, in order
    assert (src.images[:, 0, 1, 0] == 255).all() and (src.images[:, 1, 0, 0] != 255).all()
    np.testing.assert_array_equal(src.official_test, np.arange(20, 26))


def test_cifar10_root_may_name_the_batches_folder(tmp_path):
    fx.write_cifar10(tmp_path)
    assert len(cifar10.load(cfg("cifar10", tmp_path / "cifar-10-batches-py"))) == 26


def test_cifar10_missing_root(tmp_path):
    with pytest.raises(TlbenchError) as e:
        cifar10.load(cfg("cifar10", tmp_path / "nowhere"))
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "cifar-10-batches-py" in msg
    assert "dataset.download=true" in msg


def test_cifar10_root_not_set():
    with pytest.raises(TlbenchError, match="dataset.root is not set"):
        cifar10.load(cfg("cifar10", None))


def test_cifar10_missing_file(tmp_path):
    fx.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(TlbenchError) as e:
        cifar10.load(cfg("cifar10", tmp_path))
    assert "test_batch" in str(e.value) and "dataset.download=true" in str(e.value)


def test_cifar10_corrupt_pickle(tmp_path):
    fx.write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(TlbenchError, match="cannot read the CIFAR-10 pickles"):
        cifar10.load(cfg("cifar10", tmp_path))


def test_cifar10_download_goes_through_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, filename=None, md5=None):
        calls.append(url)
        fx.write_cifar10(Path(download_root))

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", fake_download)
    monkeypatch.setattr("tlbench.net._connect", lambda host, port, timeout: None)  # the host answers
    src = cifar10.load(cfg("cifar10", tmp_path / "new", download=True))
    assert calls == [cifar10.CIFAR10.url] and len(src) == 26
    cifar10.load(cfg("cifar10", tmp_path / "new", download=True))  # files present: no second fetch
    assert len(calls) == 1


def test_cifar10_download_failure_is_explained(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    monkeypatch.setattr("tlbench.net._connect", lambda host, port, timeout: None)  # the host answers
    with pytest.raises(TlbenchError, match="could not fetch CIFAR-10.*network is unreachable"):
        cifar10.load(cfg("cifar10", tmp_path, download=True))


# ----------------------------------------------------------------------------- EMNIST
@pytest.mark.parametrize("gz", [False, True])
def test_emnist_balanced_upright_labels_and_names(tmp_path, gz):
    labels = fx.write_emnist(tmp_path, n_train=12, n_test=5, gz=gz)
    src = emnist.load(cfg("emnist", tmp_path))  # split defaults to balanced
    assert src.tasks == {"label": list(fx.BALANCED)}
    assert src.images.shape == (17, 28, 28) and src.images.dtype == np.uint8
    np.testing.assert_array_equal(src.labels["label"], labels)
    np.testing.assert_array_equal(src.images[:, 10, 20], labels)  # label pixel where it was drawn
    assert (src.images[:, 0, :] == 200).all() and (src.images[:, 1:, 0] == 100).all()  # upright
    np.testing.assert_array_equal(src.official_test, np.arange(12, 17))


def test_emnist_letters_are_shifted_to_zero_based(tmp_path):
    written = fx.write_emnist(tmp_path, split="letters", n_classes=26, first_label=1, n_train=30, n_test=4,
                              mapping=None)
    src = emnist.load(cfg("emnist", tmp_path, split="letters"))
    assert src.tasks["label"] == list("abcdefghijklmnopqrstuvwxyz")
    np.testing.assert_array_equal(src.labels["label"], written - 1)
    np.testing.assert_array_equal(src.images[:, 10, 20], written)  # pixels keep the file's label


def test_emnist_letters_mapping_file(tmp_path):
    fx.write_emnist(tmp_path, split="letters", n_classes=26, first_label=1, mapping=None)
    lines = [f"{i} {64 + i} {96 + i}" for i in range(1, 27)]  # the official 3-column letters mapping
    (tmp_path / "EMNIST" / "raw" / "emnist-letters-mapping.txt").write_text("\n".join(lines))
    src = emnist.load(cfg("emnist", tmp_path, split="letters"))
    assert src.tasks["label"][:3] == ["a", "b", "c"] and len(src.tasks["label"]) == 26


def test_emnist_unknown_split(tmp_path):
    fx.write_emnist(tmp_path)
    with pytest.raises(TlbenchError) as e:
        emnist.load(cfg("emnist", tmp_path, split="lettrs"))
    assert "'lettrs'" in str(e.value) and all(s in str(e.value) for s in emnist.SPLITS)


def test_emnist_missing_split_files_name_the_path_and_present_splits(tmp_path):
    fx.write_emnist(tmp_path)
    with pytest.raises(TlbenchError) as e:
        emnist.load(cfg("emnist", tmp_path, split="digits"))
    msg = str(e.value)
    assert "emnist-digits-train-images-idx3-ubyte" in msg and "'balanced'" in msg
    assert "dataset.download=true" in msg


def test_emnist_missing_root(tmp_path):
    with pytest.raises(TlbenchError, match="does not exist"):
        emnist.load(cfg("emnist", tmp_path / "nowhere"))


def test_emnist_bad_magic_and_truncation(tmp_path):
    fx.write_emnist(tmp_path)
    path = tmp_path / "EMNIST" / "raw" / "emnist-balanced-test-labels-idx1-ubyte"
    data = path.read_bytes()
    path.write_bytes(b"\x00\x00\x08\x03" + data[4:])
    with pytest.raises(TlbenchError, match="magic number is 2051, expected 2049"):
        emnist.load(cfg("emnist", tmp_path))
    path.write_bytes(data[:-1])
    with pytest.raises(TlbenchError, match="truncated"):
        emnist.load(cfg("emnist", tmp_path))


def test_emnist_label_outside_mapping(tmp_path):
    fx.write_emnist(tmp_path, n_classes=5, mapping="0123")
    with pytest.raises(TlbenchError, match="label 4"):
        emnist.load(cfg("emnist", tmp_path))


def test_emnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    def fake_download(url, download_root, md5=None, **kw):
        fx.write_emnist(Path(download_root) / "gzip", gz=True)  # the zip holds gzip/emnist-*.gz
        gzdir = Path(download_root) / "gzip"
        for f in (gzdir / "EMNIST" / "raw").iterdir():
            f.rename(gzdir / f.name)

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", fake_download)
    monkeypatch.setattr("tlbench.net._connect", lambda host, port, timeout: None)  # the host answers
    src = emnist.load(cfg("emnist", tmp_path / "new", download=True))
    assert len(src) == 17 and (src.images[:, 0, :] == 200).all()


# ----------------------------------------------------------------------------- image folders
def test_image_folder_mixed_modes_sizes_and_order(tmp_path):
    fx.write_class_tree(tmp_path, {"cat": 5, "dog": 4})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "dog" / ".hidden.png").write_bytes(b"junk")
    src = folders.load_image_folder(cfg("image_folder", tmp_path))
    assert src.tasks == {"label": ["cat", "dog"]} and src.default_task == "label"
    assert src.relpaths == sorted(src.relpaths) and src.relpaths[1] == "cat/img_1.jpg"
    assert all(Path(p).is_absolute() and p.endswith(r) for p, r in zip(src.images, src.relpaths))
    assert file_labels(src) == src.labels["label"].tolist() == [0] * 5 + [1] * 4
    rgba = src.relpaths.index("cat/img_2.png")  # RGBA with a transparent border
    assert src.image(rgba).mode == "RGB" and src.image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert src.official_test is None and src.skipped == []


def test_image_folder_classes_subset_case_insensitive(tmp_path):
    fx.write_class_tree(tmp_path, {"Cat": 2, "Dog": 2, "Eel": 2})
    src = folders.load_image_folder(cfg("image_folder", tmp_path, classes=("eel", "CAT")))
    assert src.tasks["label"] == ["Cat", "Eel"] and len(src) == 4
    with pytest.raises(TlbenchError) as e:
        folders.load_image_folder(cfg("image_folder", tmp_path, classes=("cat", "bird")))
    assert "'bird'" in str(e.value) and "'Cat', 'Dog', 'Eel'" in str(e.value)


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(TlbenchError) as e:
        folders.load_image_folder(cfg("image_folder", tmp_path / "nope"))
    assert str(tmp_path / "nope") in str(e.value) and "ROOT/<class>/" in str(e.value)


def test_image_folder_empty_class_folder(tmp_path):
    fx.write_class_tree(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "readme.txt").write_text("x")
    with pytest.raises(TlbenchError) as e:
        folders.load_image_folder(cfg("image_folder", tmp_path))
    assert str(tmp_path / "c") in str(e.value) and "no images" in str(e.value)


def test_image_folder_without_class_folders(tmp_path):
    fx.write_image(tmp_path / "x.png", 0)
    with pytest.raises(TlbenchError, match="holds 1 images directly but no class folders"):
        folders.load_image_folder(cfg("image_folder", tmp_path))


def test_image_folder_needs_two_classes(tmp_path):
    fx.write_class_tree(tmp_path / "inner", {"a": 1, "b": 1})
    with pytest.raises(TlbenchError) as e:
        folders.load_image_folder(cfg("image_folder", tmp_path))
    assert "at least 2" in str(e.value) and "set dataset.root to it" in str(e.value)
    fx.write_class_tree(tmp_path / "two", {"a": 1, "b": 1})
    with pytest.raises(TlbenchError, match="after dataset.classes"):
        folders.load_image_folder(cfg("image_folder", tmp_path / "two", classes=("a",)))


def test_bad_image_error_names_file_and_skip_option(tmp_path):
    fx.write_class_tree(tmp_path, {"a": 2, "b": 2})
    fx.write_corrupt(tmp_path / "b" / "broken.png")
    (tmp_path / "a" / "fake.jpg").write_bytes(b"this is no jpeg")
    with pytest.raises(TlbenchError) as e:
        folders.load_image_folder(cfg("image_folder", tmp_path))
    msg = str(e.value)
    assert "2 image file(s)" in msg and str(tmp_path / "b" / "broken.png") in msg
    assert str(tmp_path / "a" / "fake.jpg") in msg and "dataset.on_bad_image=skip" in msg


def test_bad_image_skip_mode(tmp_path, caplog):
    fx.write_class_tree(tmp_path, {"a": 2, "b": 2})
    fx.write_corrupt(tmp_path / "b" / "broken.png")
    (tmp_path / "a" / "fake.jpg").write_bytes(b"this is no jpeg")
    with caplog.at_level(logging.WARNING):
        src = folders.load_image_folder(cfg("image_folder", tmp_path, on_bad_image="skip"))
    assert src.skipped == ["a/fake.jpg", "b/broken.png"] and len(src) == 4
    assert "skipped 2 unreadable" in caplog.text
    assert file_labels(src) == src.labels["label"].tolist() == [0, 0, 1, 1]


def test_skip_mode_that_empties_a_class_is_an_error(tmp_path):
    fx.write_class_tree(tmp_path, {"a": 2})
    fx.write_corrupt(tmp_path / "b" / "broken.png")
    with pytest.raises(TlbenchError, match="'b' has no readable images"):
        folders.load_image_folder(cfg("image_folder", tmp_path, on_bad_image="skip"))


# ----------------------------------------------------------------------------- chest_xray
def test_chest_xray_train_test_folders(tmp_path):
    fx.write_chest_xray(tmp_path)
    src = folders.load_chest_xray(cfg("chest_xray", tmp_path))
    assert src.tasks == {"label": ["Covid", "Normal", "Viral_Pneumonia"]}
    test = set(src.official_test.tolist())
    assert test == {i for i, r in enumerate(src.relpaths) if r.startswith("test/")} and len(test) == 4
    assert file_labels(src) == src.labels["label"].tolist()
    assert src.labels["label"].tolist() == [0, 0, 0, 1, 1, 2, 2, 0, 0, 1, 2]


def test_chest_xray_flat_layout_and_subset(tmp_path):
    fx.write_class_tree(tmp_path, {"Covid": 2, "Normal": 2, "Viral_Pneumonia": 2})
    src = folders.load_chest_xray(cfg("chest_xray", tmp_path, classes=("covid", "normal")))
    assert src.tasks["label"] == ["Covid", "Normal"] and src.official_test is None and len(src) == 4


def test_chest_xray_subset_applies_to_test_folder(tmp_path):
    fx.write_chest_xray(tmp_path)
    src = folders.load_chest_xray(cfg("chest_xray", tmp_path, classes=("Covid", "Viral_Pneumonia")))
    assert not any("Normal" in r for r in src.relpaths) and len(src.official_test) == 3
    assert file_labels(src) == [0, 0, 0, 2, 2, 0, 0, 2]  # pixels encode the on-disk class index


def test_chest_xray_unknown_class(tmp_path):
    fx.write_chest_xray(tmp_path)
    with pytest.raises(TlbenchError) as e:
        folders.load_chest_xray(cfg("chest_xray", tmp_path, classes=("Covid", "Pneumonia")))
    assert "'Pneumonia'" in str(e.value) and "'Viral_Pneumonia'" in str(e.value)


def test_chest_xray_test_class_missing_from_train(tmp_path):
    fx.write_chest_xray(tmp_path, test={"Covid": 1, "Normal": 1, "Other": 1})
    with pytest.raises(TlbenchError) as e:
        folders.load_chest_xray(cfg("chest_xray", tmp_path))
    assert str(tmp_path / "test" / "Other") in str(e.value)


def test_chest_xray_mixed_layout(tmp_path):
    fx.write_chest_xray(tmp_path, test=False)
    fx.write_class_tree(tmp_path, {"Covid": 1})
    with pytest.raises(TlbenchError, match="mixes split folders"):
        folders.load_chest_xray(cfg("chest_xray", tmp_path))


def test_chest_xray_val_folder_joins_train(tmp_path):
    fx.write_chest_xray(tmp_path)
    fx.write_class_tree(tmp_path / "val", {"Covid": 1, "Normal": 1})
    src = folders.load_chest_xray(cfg("chest_xray", tmp_path))
    assert len(src) == 13 and len(src.official_test) == 4
    assert "val/Covid/img_0.png" in src.relpaths


# ----------------------------------------------------------------------------- handwritten_digits
def test_handwritten_digits_tasks_and_labels(tmp_path):
    fx.write_handwritten_digits(tmp_path, per_digit=2)
    src = folders.load_handwritten_digits(cfg("handwritten_digits", tmp_path))
    assert src.tasks == {"digit": [str(d) for d in range(10)], "language": ["English", "Thai"]}
    assert src.default_task == "digit" and len(src) == 40 and src.official_test is None
    assert file_labels(src) == src.labels["digit"].tolist()  # RGBA Thai flattened onto white
    langs = [r.split("/")[0] for r in src.relpaths]
    assert [src.tasks["language"][i] for i in src.labels["language"]] == langs
    assert [r.split("/")[1] for r in src.relpaths] == [str(d) for d in src.labels["digit"]]


def test_handwritten_digits_language_subset(tmp_path):
    fx.write_handwritten_digits(tmp_path, per_digit=1)
    src = folders.load_handwritten_digits(cfg("handwritten_digits", tmp_path, classes=("thai",)))
    assert src.tasks["language"] == ["Thai"] and len(src) == 10


@pytest.mark.parametrize("rename", [("0", "10"), ("3", "three")])
def test_handwritten_digits_bad_digit_folder(tmp_path, rename):
    fx.write_handwritten_digits(tmp_path, languages=("Thai",), per_digit=1)
    (tmp_path / "Thai" / rename[0]).rename(tmp_path / "Thai" / rename[1])
    with pytest.raises(TlbenchError) as e:
        folders.load_handwritten_digits(cfg("handwritten_digits", tmp_path))
    msg = str(e.value)
    assert str(tmp_path / "Thai") in msg and rename[1] in msg and f"missing {rename[0]}" in msg


def test_handwritten_digits_empty_digit_folder(tmp_path):
    fx.write_handwritten_digits(tmp_path, languages=("English",), per_digit=1)
    for f in (tmp_path / "English" / "4").iterdir():
        f.unlink()
    with pytest.raises(TlbenchError, match="English/4 contains no images"):
        folders.load_handwritten_digits(cfg("handwritten_digits", tmp_path))


def test_handwritten_digits_no_languages(tmp_path):
    with pytest.raises(TlbenchError, match="no language folders"):
        folders.load_handwritten_digits(cfg("handwritten_digits", tmp_path))


# ----------------------------------------------------------------------------- real shared data
SHARED = Path(os.environ.get("TLBENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared data {path} not present (set TLBENCH_SHARED_DATA)")
    return path


@pytest.mark.realdata
def test_real_cifar10():
    src = cifar10.load(cfg("cifar10", shared("cifar10")))
    assert len(src) == 7000 and len(src.official_test) == 2000 and len(src.tasks["label"]) == 10
    assert np.bincount(src.labels["label"][src.official_test]).tolist() == [200] * 10


@pytest.mark.realdata
def test_real_emnist():
    src = emnist.load(cfg("emnist", shared("emnist"), split="balanced"))
    assert src.images.shape == (10528, 28, 28) and len(src.official_test) == 2350
    assert "".join(src.tasks["label"]) == fx.BALANCED
    # upright: a '1' is a vertical stroke, so its ink varies far more across columns than rows
    ones = src.images[src.labels["label"] == 1].astype(float).mean(0)
    assert ones.mean(0).std() > 2 * ones.mean(1).std()


@pytest.mark.realdata
def test_real_handwritten_digits():
    src = folders.load_handwritten_digits(cfg("handwritten_digits", shared("handwritten_digits")))
    assert src.tasks["language"] == ["English", "Thai"] and len(src) == 3528
    assert np.bincount(src.labels["language"]).tolist() == [800, 2728]
    assert src.image(0).mode in ("L", "RGB")


@pytest.mark.realdata
def test_real_chest_xray():
    src = folders.load_chest_xray(cfg("chest_xray", shared("chest_xray")))
    assert src.tasks["label"] == ["Covid", "Normal", "Viral_Pneumonia"] and len(src) == 230
    assert len(src.official_test) == 44 and np.bincount(src.labels["label"]).tolist() == [97, 66, 67]
