"""Writers for tiny datasets in each official on-disk format (plain functions, importable).

Every image encodes its label in its pixels so tests can check that labels and images
stay paired: see :func:`label_value` / :func:`decode_label`.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BALANCED = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabdefghnqrt"


def label_value(label: int) -> int:
    """The gray level that encodes ``label`` (0..24) in file-based fixture images."""
    return 10 * label + 5


def decode_label(value: float) -> int:
    return int(round((float(value) - 5) / 10))


# ----------------------------------------------------------------------------- CIFAR-10
class _Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes ``str`` and ``bytes`` as Python-2 byte strings, like the official CIFAR pickles.

    Loaded with ``encoding='latin1'`` (torchvision) they become ``str``; with
    ``encoding='bytes'`` they become ``bytes`` (``b'data'``, ``b'labels'``, ...).
    """

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_py2_str(self, obj: "str | bytes") -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str  # numpy's raw array data, a py2 str in the official files


def py2_pickle(obj, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def cifar_image(label: int, index: int) -> np.ndarray:
    """(32,32,3) uint8: R = 20*label, G = index, B = 7, and R[0,1] = 255 (orientation mark)."""
    img = np.zeros((32, 32, 3), dtype=np.uint8)
    img[..., 0] = 20 * label
    img[..., 1] = index % 256
    img[..., 2] = 7
    img[0, 1, 0] = 255
    return img


def write_cifar10(root: Path, per_batch: int = 4, n_test: int = 6, names=CIFAR_NAMES) -> np.ndarray:
    """ROOT/cifar-10-batches-py/ with 5 train batches + test_batch; returns all labels in order."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    all_labels, index = [], 0
    for b, n in enumerate([per_batch] * 5 + [n_test]):
        labels = [(index + i) % len(names) for i in range(n)]
        imgs = np.stack([cifar_image(lab, index + i) for i, lab in enumerate(labels)])
        data = imgs.transpose(0, 3, 1, 2).reshape(n, 3072)  # 1024 R, 1024 G, 1024 B per row
        test = b == 5
        batch = {
            "batch_label": "testing batch 1 of 1" if test else f"training batch {b + 1} of 5",
            "labels": labels,
            "data": data,
            "filenames": [f"img_{index + i:05d}.png" for i in range(n)],
        }
        py2_pickle(batch, folder / ("test_batch" if test else f"data_batch_{b + 1}"))
        all_labels += labels
        index += n
    meta = {"num_cases_per_batch": per_batch, "label_names": list(names), "num_vis": 3072}
    py2_pickle(meta, folder / "batches.meta")
    return np.asarray(all_labels)


# ----------------------------------------------------------------------------- EMNIST
def emnist_upright(label: int) -> np.ndarray:
    """(28,28) upright image: top row 200, left column (below it) 100, pixel [10,20] = label."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[0, :] = 200
    img[1:, 0] = 100
    img[10, 20] = label
    return img


def _write_idx(path: Path, array: np.ndarray, magic: int, gz: bool) -> None:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    blob = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        with gzip.open(f"{path}.gz", "wb") as f:
            f.write(blob)
    else:
        Path(path).write_bytes(blob)


def write_emnist(root: Path, split: str = "balanced", n_train: int = 12, n_test: int = 5,
                 n_classes: int = 47, first_label: int = 0, gz: bool = False, mapping: str | None = BALANCED):
    """ROOT/EMNIST/raw/emnist-<split>-* idx files (images stored transposed, like EMNIST).

    Labels cycle through ``first_label .. first_label + n_classes - 1`` (``letters``: 1..26).
    ``mapping``: characters written to emnist-<split>-mapping.txt (None: no file).
    Returns the labels as written in the files (train then test).
    """
    raw = Path(root) / "EMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    labels = [first_label + i % n_classes for i in range(n_train + n_test)]
    for part, sl in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        part_labels = np.asarray(labels[sl], dtype=np.uint8)
        stored = np.stack([emnist_upright(lab).T for lab in part_labels])  # EMNIST stores transposed
        _write_idx(raw / f"emnist-{split}-{part}-images-idx3-ubyte", stored, 2051, gz)
        _write_idx(raw / f"emnist-{split}-{part}-labels-idx1-ubyte", part_labels, 2049, gz)
    if mapping is not None:
        lines = [f"{first_label + i} {ord(c)}" for i, c in enumerate(mapping)]
        (raw / f"emnist-{split}-mapping.txt").write_text("\n".join(lines) + "\n")
    return np.asarray(labels)


# ----------------------------------------------------------------------------- image files
def write_image(path: Path, label: int, mode: str = "RGB", size=(20, 16), fmt: str | None = None) -> Path:
    """An image whose central block has gray level ``label_value(label)``.

    RGBA: the border is fully transparent (flattened to white on load); L/P/RGB: white border.
    """
    w, h = size
    v = label_value(label)
    gray = Image.new("L", size, 255)
    gray.paste(v, (w // 4, h // 4, w - w // 4, h - h // 4))
    if mode == "RGBA":
        im = Image.new("RGBA", size, (0, 0, 0, 0))
        im.paste((v, v, v, 255), (w // 4, h // 4, w - w // 4, h - h // 4))
    elif mode == "P":
        im = gray.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)  # exact: 2 colors
    else:
        im = gray.convert(mode)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


def write_corrupt(path: Path) -> Path:
    """A PNG cut in half (its header opens, decoding fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, format="PNG")  # noise: incompressible
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def write_class_tree(root: Path, counts: dict[str, int], modes=("RGB", "L", "RGBA", "P")) -> None:
    """ROOT/<class>/img_<k>.png (+ one .jpg), mixed modes and sizes; label = index in sorted names."""
    for label, name in enumerate(sorted(counts)):
        for k in range(counts[name]):
            mode = modes[k % len(modes)]
            size = (16 + 4 * k, 12 + 2 * (k % 3))
            ext = "jpg" if k == 1 and mode in ("RGB", "L") else "png"
            write_image(Path(root) / name / f"img_{k}.{ext}", label, mode=mode, size=size)


def write_chest_xray(root: Path, train=None, test=None) -> None:
    """ROOT/train/<Class>/* and ROOT/test/<Class>/* (test=False: no test folder)."""
    write_class_tree(Path(root) / "train", train or {"Covid": 3, "Normal": 2, "Viral_Pneumonia": 2})
    if test is not False:
        write_class_tree(Path(root) / "test", test or {"Covid": 2, "Normal": 1, "Viral_Pneumonia": 1})


def write_handwritten_digits(root: Path, languages=("English", "Thai"), per_digit: int = 2) -> None:
    """ROOT/<Language>/<digit>/*.png; English: small grayscale/P, Thai: RGBA with transparency."""
    for language in languages:
        for digit in range(10):
            for k in range(per_digit):
                if language == "Thai":
                    mode, size = "RGBA", (30 + k, 30)
                else:
                    mode, size = ("L", "P")[k % 2], (28, 28)
                write_image(Path(root) / language / str(digit) / f"{digit}-{k:03d}.png", digit, mode, size)


# ----------------------------------------------------------------------------- 16-bit images
def gray16(size=(20, 16), seed: int = 0) -> np.ndarray:
    """(h, w) uint16 gray levels over the whole 16-bit range (not multiples of 257)."""
    w, h = size
    rng = np.random.default_rng(seed)
    return rng.integers(0, 65536, size=(h, w), dtype=np.uint16)


def to_8bit(a16: np.ndarray) -> np.ndarray:
    """The 8-bit version of 16-bit levels: round(v / 257) (65535 -> 255)."""
    return np.round(np.asarray(a16, dtype=np.float64) / 257.0).astype(np.uint8)


def write_png16(path: Path, a16: np.ndarray) -> Path:
    """A 16-bit PNG (grayscale (h, w), or RGB (h, w, 3)), encoded by hand: Pillow writes 16-bit
    grayscale but not 16-bit RGB."""
    import zlib

    a = np.asarray(a16, dtype=">u2")
    color = 0 if a.ndim == 2 else 2
    h, w = a.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + a[y].tobytes() for y in range(h))  # filter type 0 per row
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path
