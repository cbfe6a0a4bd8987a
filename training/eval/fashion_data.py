"""Minimal Fashion-MNIST idx reader for the evaluation toolkit (private to training/eval).

Images come back as uint8 arrays of shape [N, 32, 32]: the 28x28 originals padded by 2 pixels on
every side with background 0. Labels come back as int64 arrays of shape [N]. The files are read
from training.data's directory: $DMDSERVE_FASHION_MNIST_DIR if set, else Debian's
/usr/share/datasets/fashion-mnist.
"""

import gzip

import numpy as np

from training import data

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
IMAGE_SIZE = 32
_PAD = 2
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path, expected_magic, expected_dims):
    """Reads a gzipped big-endian idx file of uint8 values; raises ValueError on a bad header."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path}: idx magic {magic}, expected {expected_magic}")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(expected_dims)]
    offset = 4 + 4 * expected_dims
    values = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if values.size != int(np.prod(dims)):
        raise ValueError(f"{path}: {values.size} values, header says {dims}")
    return values.reshape(dims)


def load_split(split, data_dir=None):
    """Returns (images uint8 [N, 32, 32], labels int64 [N]) for split 'train' or 'test'
    (data_dir None = training.data.fashion_mnist_dir())."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = data_dir or data.fashion_mnist_dir()
    image_file, label_file = _FILES[split]
    images = _read_idx(data.split_path(data_dir, image_file), 2051, 3)
    labels = _read_idx(data.split_path(data_dir, label_file), 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    padded = np.pad(images, ((0, 0), (_PAD, _PAD), (_PAD, _PAD)), constant_values=0)
    return np.ascontiguousarray(padded), labels
