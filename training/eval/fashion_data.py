"""Fashion-MNIST as the evaluation toolkit uses it (private to training/eval): uint8 images.

Images come back as uint8 arrays of shape [N, 32, 32]: the 28x28 originals padded by 2 pixels on
every side with background 0. Labels come back as int64 arrays of shape [N]. The files are read
with training.data's idx readers from its directory: $DMDSERVE_FASHION_MNIST_DIR if set, else
Debian's /usr/share/datasets/fashion-mnist.
"""

import numpy as np

from training import data

IMAGE_SIZE = 32


def load_split(split, data_dir=None):
    """Returns (images uint8 [N, 32, 32], labels int64 [N]) for split 'train' or 'test'
    (data_dir None = training.data.fashion_mnist_dir())."""
    if split not in data.SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = data_dir or data.fashion_mnist_dir()
    image_file, label_file, _ = data.SPLITS[split]
    images = data.read_idx_images(data.split_path(data_dir, image_file))
    labels = data.read_idx_labels(data.split_path(data_dir, label_file)).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    pad = (data.PAD, data.PAD)
    padded = np.pad(images, ((0, 0), pad, pad), constant_values=0)
    return np.ascontiguousarray(padded), labels
