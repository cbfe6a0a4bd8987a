"""Text captions for Fashion-MNIST classes and their CLIP tokenization.

CAPTIONS[label] lists distinct phrasings for each class; `sample_captions` picks one per label
deterministically from a seed; `tokenize` turns captions into padded 77-token CLIP input_ids
using the repository's reference tokenizer (tools/clip_tokenizer_reference.py).
"""

import os
import random

import torch

from training import data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO_ROOT, "models", "tokenizers", "openai-clip")
MAX_LENGTH = 77

CLASS_NAMES = data.CLASS_NAMES  # CAPTIONS[label] describes CLASS_NAMES[label]

CAPTIONS = (
    ("a t-shirt", "a photo of a t-shirt", "a tee", "a short-sleeved top", "a plain t-shirt",
     "a casual top", "a cotton tee shirt"),
    ("a pair of trousers", "a photo of trousers", "pants", "a pair of jeans", "slacks",
     "long trousers", "a pair of pants"),
    ("a pullover", "a photo of a pullover", "a sweater", "a jumper", "a knitted sweater",
     "a long-sleeved pullover", "a warm jumper"),
    ("a dress", "a photo of a dress", "a gown", "a summer dress", "a long dress", "a frock",
     "an evening dress"),
    ("a coat", "a photo of a coat", "a jacket", "an overcoat", "a winter coat", "a raincoat",
     "a long jacket with buttons"),
    ("a sandal", "a photo of a sandal", "sandals", "a summer sandal", "an open-toed shoe",
     "a strappy sandal", "a flip-flop"),
    ("a shirt", "a photo of a shirt", "a button-up shirt", "a blouse", "a dress shirt",
     "a collared shirt", "a long-sleeved shirt"),
    ("a sneaker", "a photo of a sneaker", "a running shoe", "trainers", "a sports shoe",
     "a canvas sneaker", "a low-top sneaker"),
    ("a bag", "a photo of a bag", "a handbag", "a purse", "a tote bag", "a shoulder bag",
     "a leather handbag"),
    ("an ankle boot", "a photo of an ankle boot", "a boot", "a short boot", "a leather boot",
     "a heeled ankle boot", "a chelsea boot"),
)


_tokenizer = None


def tokenizer():
    """The shared reference CLIP tokenizer (loaded once)."""
    global _tokenizer
    if _tokenizer is None:
        # Imported on first use: building its character classes takes about a second.
        from tools import clip_tokenizer_reference
        _tokenizer = clip_tokenizer_reference.Tokenizer(TOKENIZER_DIR)
    return _tokenizer


def input_ids(text):
    """77 CLIP ids: BOS 49406, at most 75 text ids, EOS 49407, then 49407 padding."""
    row, _ = tokenizer().for_model(tokenizer().encode(text), MAX_LENGTH)
    return row


def tokenize(texts):
    """List of captions -> int64 tensor [N, 77] of input_ids."""
    return torch.tensor([input_ids(t) for t in texts], dtype=torch.int64)


def sample_captions(labels, seed):
    """One caption per label, uniform over that class's phrasings; the same seed gives the same
    picks."""
    rng = random.Random(seed)
    return [CAPTIONS[int(label)][rng.randrange(len(CAPTIONS[int(label)]))] for label in labels]
