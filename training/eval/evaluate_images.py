"""Evaluates a set of generated Fashion-MNIST images against the real test set.

Usage (from the repo root):
  /usr/bin/python3 -m training.eval.evaluate_images --images DIR [--json out.json]
  /usr/bin/python3 -m training.eval.evaluate_images --real-test 5000   # real-vs-real floor

Naming convention for --images: every *.png in DIR is named `<class_index>-<anything>.png`, where
<class_index> (0-9, Fashion-MNIST order) is the class the image was prompted with. `dmdctl generate
--prefix=<class_index> --out_dir=DIR` writes `<class_index>-<i>-seed<seed>.png`, which fits. Other
files are ignored; a PNG whose name does not start with a class index is an error. Images are
converted to 8-bit grey; 32x32 images are used as is, 28x28 ones are padded with 2 black pixels per
side, any other size is resized to 32x32 (bilinear).

Reported: Frechet distance of classifier features to the reference set (FID), class accuracy
(fraction classified as the prompted class) and within-class diversity relative to real images.
With --images the reference is the whole test set (10000 images); with --real-test N the test set is
shuffled (--seed), the first N images play the generated set and the other 10000 - N are the
reference, so the two are disjoint and the result is the floor a perfect generator would reach.
FID depends on the set size: compare a generated set with the floor measured at the same N.
"""

import argparse
import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

from training import data
from training.eval import fashion_data, metrics
from training.eval.classifier import embed_images, load_classifier

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                                  "checkpoints", "classifier.pt")
_NAME = re.compile(r"^(\d+)-.*\.png$")


def _to_32x32(image):
    """Converts a PIL image to a uint8 grey array [32, 32] (pad 28x28, resize other sizes)."""
    grey = image.convert("L")
    if grey.size == (28, 28):
        return np.pad(np.asarray(grey), 2, constant_values=0)
    if grey.size != (32, 32):
        grey = grey.resize((32, 32), Image.BILINEAR)
    return np.asarray(grey)


def load_image_dir(directory):
    """Reads `<class_index>-<anything>.png` files from `directory` (sorted by name).

    Returns (images uint8 [N, 32, 32], prompted class labels int64 [N], file names).
    Raises ValueError for a PNG without a valid class index and when no PNG is found.
    """
    names = sorted(n for n in os.listdir(directory) if n.lower().endswith(".png"))
    images, labels = [], []
    for name in names:
        match = _NAME.match(name)
        if not match or int(match.group(1)) >= len(data.CLASS_NAMES):
            raise ValueError(f"{os.path.join(directory, name)}: name must be "
                             f"<class_index 0-9>-<anything>.png")
        with Image.open(os.path.join(directory, name)) as image:
            images.append(_to_32x32(image))
        labels.append(int(match.group(1)))
    if not images:
        raise ValueError(f"no .png files in {directory}")
    return np.stack(images), np.array(labels, dtype=np.int64), names


def real_split(total, count, seed=0):
    """The real-vs-real split: indices of `count` images playing the generated set and of the
    other `total - count` forming the reference, disjoint, shuffled by `seed`. The real floor of
    --real-test, evaluate_served and quick_eval --reconstruction all use it."""
    order = np.random.default_rng(seed).permutation(total)
    return order[:count], order[count:]


def evaluate(model, images, labels, reference_images, reference_labels):
    """Computes all metrics for uint8 images [N, 32, 32] prompted with `labels` against a real
    reference set. Returns a JSON-ready dict."""
    logits, features = embed_images(model, images)
    _, reference_features = embed_images(model, reference_images)
    predicted = logits.argmax(1)
    diversity = metrics.diversity_ratio(features, labels, reference_features, reference_labels)
    per_class_accuracy = {
        int(c): metrics.class_accuracy(predicted[labels == c], labels[labels == c])
        for c in np.unique(labels)}
    return {
        "num_images": int(len(images)),
        "num_reference": int(len(reference_images)),
        "fid": metrics.frechet_distance(features, reference_features),
        "class_accuracy": metrics.class_accuracy(predicted, labels),
        "diversity_ratio": diversity["mean"],
        "diversity": metrics.within_class_diversity(features, labels),
        "reference_diversity": metrics.within_class_diversity(reference_features, reference_labels),
        "per_class_accuracy": per_class_accuracy,
        "per_class_diversity_ratio": diversity["per_class"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="directory of <class_index>-<anything>.png files")
    source.add_argument("--real-test", type=int, metavar="N",
                        help="use N real test images as the generated set (the floor)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed for --real-test")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    test_images, test_labels = fashion_data.load_split("test")
    if args.images is not None:
        try:
            images, labels, _ = load_image_dir(args.images)
        except (OSError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        reference_images, reference_labels = test_images, test_labels
    else:
        if not 2 <= args.real_test <= len(test_images) - 2:
            parser.error(f"--real-test must be in [2, {len(test_images) - 2}]")
        chosen, rest = real_split(len(test_images), args.real_test, args.seed)
        images, labels = test_images[chosen], test_labels[chosen]
        reference_images, reference_labels = test_images[rest], test_labels[rest]

    try:
        results = evaluate(load_classifier(args.checkpoint), images, labels, reference_images,
                           reference_labels)
    except (OSError, RuntimeError, ValueError) as error:  # Missing checkpoint, < 2 images, ...
        print(f"error: {error}", file=sys.stderr)
        return 1
    results["source"] = args.images if args.images is not None else f"real-test:{args.real_test}"
    ratio = results["diversity_ratio"]
    print(f"images {results['num_images']} vs reference {results['num_reference']}: "
          f"FID {results['fid']:.3f}  class accuracy {results['class_accuracy']:.4f}  "
          f"diversity ratio {'n/a' if ratio is None else f'{ratio:.4f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
