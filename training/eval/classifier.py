"""Small Fashion-MNIST CNN used to evaluate generated images (accuracy and feature statistics).

Input convention: float tensors [N, 1, 32, 32] in [-1, 1], i.e. uint8 pixels scaled x / 127.5 - 1,
so the background is -1. `to_input` does this conversion.
"""

import numpy as np
import torch
from torch import nn

FEATURE_DIM = 128
NUM_CLASSES = 10


class FashionClassifier(nn.Module):
    """Three conv blocks (32 -> 16 -> 8 -> 4 pixels) and a 128-d penultimate layer.

    forward(x) returns logits [N, 10]; features(x) returns the penultimate ReLU activations
    [N, 128] (before dropout), the embedding used for Frechet distance and diversity.
    """

    def __init__(self, width=32, feature_dim=FEATURE_DIM, dropout=0.3):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.MaxPool2d(2))

        self.config = {"width": width, "feature_dim": feature_dim, "dropout": dropout}
        self.conv = nn.Sequential(block(1, width), block(width, 2 * width),
                                  block(2 * width, 4 * width))
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 4 * 4, feature_dim),
                                   nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, NUM_CLASSES)

    def features(self, x):
        """Penultimate activations [N, feature_dim] for inputs [N, 1, 32, 32] in [-1, 1]."""
        return self.embed(self.conv(x))

    def forward(self, x):
        return self.head(self.dropout(self.features(x)))


def to_input(images):
    """Converts uint8 images [N, 32, 32] (numpy or tensor) to float [N, 1, 32, 32] in [-1, 1]."""
    images = torch.as_tensor(np.asarray(images))
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(
            f"expected uint8 images [N, H, W], got {images.dtype} {tuple(images.shape)}")
    return images.unsqueeze(1).float() / 127.5 - 1.0


def save_classifier(model, path):
    """Writes the model's config and weights to `path` (a plain dict, loadable by torch.load)."""
    torch.save({"config": model.config, "state_dict": model.state_dict()}, path)


def load_classifier(path):
    """Loads a classifier written by save_classifier, in eval mode on the CPU."""
    checkpoint = torch.load(path, map_location="cpu")
    model = FashionClassifier(**checkpoint["config"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


@torch.no_grad()
def embed_images(model, images, batch_size=500):
    """Runs the model in eval mode over uint8 images [N, 32, 32].

    Returns (logits float64 [N, 10], features float64 [N, feature_dim]) as numpy arrays.
    """
    model.eval()
    logits, features = [], []
    for start in range(0, len(images), batch_size):
        x = to_input(images[start:start + batch_size])
        f = model.features(x)
        features.append(f.double().numpy())
        logits.append(model.head(f).double().numpy())
    if not features:
        return np.zeros((0, NUM_CLASSES)), np.zeros((0, model.config["feature_dim"]))
    return np.concatenate(logits), np.concatenate(features)
