"""Trains the Fashion-MNIST evaluation classifier and writes its checkpoint and a JSON summary.

Usage (from the repo root, one CPU thread):
  /usr/bin/python3 -m training.eval.train_classifier --epochs 5 \
      --out training/checkpoints/classifier.pt
Deterministic for a given --seed (single thread, seeded generator, deterministic algorithms).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from torch import nn

from training.eval import fashion_data
from training.eval.classifier import FashionClassifier, embed_images, save_classifier, to_input


def train(model, images, labels, epochs, batch_size=128, lr=3e-3, seed=0, log=None,
          max_steps=0):
    """Trains `model` in place with Adam and a one-cycle LR schedule; returns per-step losses.

    images: uint8 [N, 32, 32]; labels: int64 [N]. Light augmentation: random horizontal flips.
    max_steps > 0 stops early after that many optimizer steps (0 = run all epochs).
    log(step, epoch, loss) is called every 100 steps when given.
    """
    generator = torch.Generator().manual_seed(seed)
    x_all = to_input(images)
    y_all = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    steps_per_epoch = (len(x_all) + batch_size - 1) // batch_size
    total_steps = epochs * steps_per_epoch
    if max_steps > 0:
        total_steps = min(total_steps, max_steps)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    losses = []
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(x_all), batch_size):
            if len(losses) == total_steps:
                return losses
            index = order[start:start + batch_size]
            x, y = x_all[index], y_all[index]
            flip = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if log is not None and len(losses) % 100 == 0:
                log(len(losses), epoch, float(np.mean(losses[-100:])))
    return losses


def accuracy(model, images, labels):
    """Fraction of uint8 images [N, 32, 32] whose argmax logit equals the label."""
    logits, _ = embed_images(model, images)
    return float(np.mean(logits.argmax(1) == np.asarray(labels)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--out", default="training/checkpoints/classifier.pt",
                        help="checkpoint path; the summary goes next to it with suffix .json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subset", type=int, default=0,
                        help="train on the first N training images (0 = all 60000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.subset < 0 or args.batch_size < 1:
        parser.error("--epochs and --batch-size must be >= 1, --subset >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    train_x, train_y = fashion_data.load_split("train")
    test_x, test_y = fashion_data.load_split("test")
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]

    model = FashionClassifier()
    start = time.time()

    def log(step, epoch, loss):
        print(f"step {step} epoch {epoch} loss {loss:.4f} elapsed {time.time() - start:.0f}s",
              flush=True)

    losses = train(model, train_x, train_y, args.epochs, args.batch_size, args.lr, args.seed, log)
    train_seconds = time.time() - start
    test_accuracy = accuracy(model, test_x, test_y)
    print(f"test accuracy {test_accuracy:.4f} after {args.epochs} epochs, "
          f"training took {train_seconds:.0f}s", flush=True)

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    save_classifier(model, args.out)
    summary = {
        "test_accuracy": test_accuracy, "test_images": len(test_x), "epochs": args.epochs,
        "train_images": len(train_x), "steps": len(losses), "final_loss": losses[-1],
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
        "threads": args.threads, "train_seconds": round(train_seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__,
    }
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
