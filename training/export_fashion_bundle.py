"""Exports a trained Fashion-MNIST model (teacher or DMD checkpoint) as a dmdserve bundle
(docs/BUNDLE.md): TorchScript text encoder, UNet (the bundle's generator) and autoencoder decoder,
model.json and the CLIP tokenizer files.

  /usr/bin/python3 -m training.export_fashion_bundle --checkpoint training/checkpoints/dmd.pt \
      --name fashion-dmd --steps 1 --out models/fashion-dmd
  /usr/bin/python3 -m training.export_fashion_bundle --checkpoint training/checkpoints/teacher.pt \
      --name fashion-teacher --steps 50 --guidance 3 --out models/fashion-teacher

--steps N uses the timesteps 999 - k * (1000 // N) (DMD2's spacing; [999] for one step) with
DDIM steps between them; --guidance > 1 turns on classifier-free guidance in the server.
Python's hash seed is fixed (TorchScript writes constants in set order), so the same checkpoint
gives the same files.
"""

import argparse
import os
import sys

from tools import bundle_files
from training import common, t2i, train_teacher
from training.autoencoder import load_checkpoint as load_autoencoder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_DIR = os.path.join(REPO_ROOT, "models", "tokenizers", "openai-clip")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "LICENSE")
BATCH_SIZES = [1, 2, 4, 8, 16]
IMAGE_SIZE = 32
DOWNSAMPLE_FACTOR = 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="train_teacher / train_dmd output")
    p.add_argument("--autoencoder", default=common.AUTOENCODER_CHECKPOINT)
    p.add_argument("--name", required=True, help="model name in the API")
    p.add_argument("--description", default="")
    p.add_argument("--steps", type=int, default=1, help="sampling steps (1..1000)")
    p.add_argument("--guidance", type=float, default=1.0, help="CFG scale (1 = off)")
    p.add_argument("--out", required=True, help="bundle directory (created)")
    return p.parse_args(argv)


def schedule(steps):
    """The manifest's schedule block for `steps` DDIM steps on SD's scaled-linear schedule."""
    return bundle_files.dmd2_sd_schedule(steps, "ddim")


def manifest(name, description, steps, guidance, scaling_factor):
    return {
        "format": "dmdserve.bundle/v1",
        "name": name,
        "description": description,
        "image": {"width": IMAGE_SIZE, "height": IMAGE_SIZE, "channels": 1},
        "latent": {"channels": t2i.LATENT_CHANNELS, "downsample_factor": DOWNSAMPLE_FACTOR},
        "tokenizer": {"vocab": "tokenizer/vocab.json", "merges": "tokenizer/merges.txt",
                      "max_length": t2i.MAX_LENGTH},
        "components": {"text_encoder": "text_encoder.pt", "generator": "generator.pt",
                       "decoder": "decoder.pt"},
        "prediction_type": "epsilon",
        "schedule": schedule(steps),
        "guidance_scale": guidance,
        "latent_scaling_factor": scaling_factor,
        "dtype": "float32",
        "batch_sizes": BATCH_SIZES,
        "max_images_per_request": max(BATCH_SIZES),
    }


def export(args):
    if not 1 <= args.steps <= 1000:
        raise SystemExit(f"--steps must be in [1, 1000], got {args.steps}")
    if args.guidance < 1:
        raise SystemExit(f"--guidance must be >= 1, got {args.guidance}")
    text_encoder, unet = train_teacher.load_checkpoint(args.checkpoint)
    autoencoder, scaling_factor = load_autoencoder(args.autoencoder)
    os.makedirs(os.path.join(args.out, bundle_files.TOKENIZER_SUBDIR), exist_ok=True)
    for name, module in (("text_encoder", text_encoder), ("generator", unet),
                         ("decoder", autoencoder.decoder)):
        bundle_files.save_component(module.eval(), args.out, name + ".pt")
    bundle_files.copy_tokenizer(TOKENIZER_DIR, args.out, TOKENIZER_FILES)
    bundle_files.write_manifest(args.out, manifest(args.name, args.description, args.steps,
                                                   args.guidance, scaling_factor))


if __name__ == "__main__":
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable,
                  [sys.executable, "-m", "training.export_fashion_bundle"] + sys.argv[1:],
                  dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=REPO_ROOT))
    export(parse_args())
