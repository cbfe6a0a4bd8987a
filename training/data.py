"""Fashion-MNIST loading from the gzip'd idx files.

The files are read from $DMDSERVE_FASHION_MNIST_DIR if it is set, else from Debian's
dataset-fashion-mnist directory (DEFAULT_DIR); training/eval/fashion_data.py reads them with the
readers here.

Images come out as float32 tensors [N, 1, 32, 32] in [-1, 1]: the 28x28 uint8 pixels are mapped
linearly (0 -> -1, 255 -> 1) and padded by 2 px on every side with the background value -1.
Loading is deterministic; `subset` keeps the first `subset` examples (no shuffling).
"""

import gzip
import os
import struct

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DIR_ENV = "DMDSERVE_FASHION_MNIST_DIR"  # overrides DEFAULT_DIR (e.g. a copy on another machine)
IMAGES_MAGIC = 2051  # idx3, unsigned byte
LABELS_MAGIC = 2049  # idx1, unsigned byte
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")  # index = label
NUM_CLASSES = len(CLASS_NAMES)
PAD = 2


class IdxFormatError(ValueError):
    """An idx file is malformed (bad magic number, header or size)."""


def fashion_mnist_dir():
    """The directory the idx files are read from: $DMDSERVE_FASHION_MNIST_DIR or DEFAULT_DIR."""
    return os.environ.get(DIR_ENV) or DEFAULT_DIR


def split_path(directory, name):
    """Path of the idx file `name` in `directory`; FileNotFoundError naming both if missing."""
    path = os.path.join(directory, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Fashion-MNIST file {name} not found in {directory} "
                                f"(${DIR_ENV} if set, else {DEFAULT_DIR})")
    return path


def _read_gz(path):
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise IdxFormatError(f"{path}: cannot read gzip data: {e}") from e


def read_idx_images(path):
    """Returns a uint8 array [N, rows, cols] from an idx3-ubyte .gz file."""
    data = _read_gz(path)
    if len(data) < 16:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx3 header (16)")
    magic, count, rows, cols = struct.unpack(">IIII", data[:16])
    if magic != IMAGES_MAGIC:
        raise IdxFormatError(f"{path}: magic number {magic} is not {IMAGES_MAGIC} (idx3 ubyte)")
    expected = 16 + count * rows * cols
    if len(data) != expected:
        raise IdxFormatError(f"{path}: size {len(data)} bytes, header ({count}x{rows}x{cols}) "
                             f"implies {expected}")
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, rows, cols)


def read_idx_labels(path):
    """Returns a uint8 array [N] from an idx1-ubyte .gz file."""
    data = _read_gz(path)
    if len(data) < 8:
        raise IdxFormatError(f"{path}: {len(data)} bytes is too short for an idx1 header (8)")
    magic, count = struct.unpack(">II", data[:8])
    if magic != LABELS_MAGIC:
        raise IdxFormatError(f"{path}: magic number {magic} is not {LABELS_MAGIC} (idx1 ubyte)")
    if len(data) != 8 + count:
        raise IdxFormatError(f"{path}: size {len(data)} bytes, header ({count} labels) "
                             f"implies {8 + count}")
    return np.frombuffer(data, dtype=np.uint8, offset=8)


def to_model_images(pixels):
    """uint8 [N, 28, 28] -> float32 tensor [N, 1, 32, 32] in [-1, 1], padded with -1."""
    x = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
    return torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD), value=-1.0)


def load_split(split, subset=None, data_dir=None):
    """Loads `split` ("train" or "test"); returns (images [N,1,32,32] float32, labels [N] int64).

    subset: keep only the first `subset` examples (None or 0 = all).
    data_dir: where the idx files are (None = fashion_mnist_dir()).
    """
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is not one of {sorted(SPLITS)}")
    data_dir = data_dir or fashion_mnist_dir()
    images_name, labels_name, expected = SPLITS[split]
    pixels = read_idx_images(split_path(data_dir, images_name))
    labels = read_idx_labels(split_path(data_dir, labels_name))
    if len(pixels) != expected or len(labels) != expected:
        raise IdxFormatError(f"{data_dir}: {split} split has {len(pixels)} images and "
                             f"{len(labels)} labels, expected {expected} of each")
    if labels.max() >= NUM_CLASSES:
        raise IdxFormatError(f"{data_dir}/{labels_name}: label {labels.max()} >= {NUM_CLASSES}")
    if subset:
        pixels, labels = pixels[:subset], labels[:subset]
    return to_model_images(pixels), torch.from_numpy(labels.astype(np.int64))
