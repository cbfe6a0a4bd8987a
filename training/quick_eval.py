"""In-process evaluation used during training (curves and model selection): generate images with
the Python sampling loop, classify them with the committed classifier and compare with the real
test set. The reported numbers of the finished models come from images made by the server
(training/evaluate_served.py); this is for monitoring and for choices made before export.

As a command it makes three measurements docs/FASHION.md quotes:
  # the teacher's guidance scale (and step count) chosen by FID, e.g. g = 3 vs 5 at 20 steps
  /usr/bin/python3 -m training.quick_eval --checkpoint training/checkpoints/teacher.pt \
      --steps 20 --guidance 3 5 --per-class 30
  # the autoencoder's own floor: real test images through encoder + decoder, scored against the
  # rest of the test set, next to the real-vs-real floor of the same images
  /usr/bin/python3 -m training.quick_eval --reconstruction 320
  # the teacher images an ODE-pair file holds (make_ode_pairs --out), the regression targets:
  # their diversity bounds what the regression loss teaches the student
  /usr/bin/python3 -m training.quick_eval --pairs ode_pairs_s30.pt ode_pairs_s10.pt
"""

import argparse
import json
import sys

import numpy as np
import torch

from training import captions, common, t2i, train_teacher
from training.eval import classifier as clf
from training.eval import evaluate_images, fashion_data, metrics

CLASSIFIER_CHECKPOINT = "training/checkpoints/classifier.pt"


class QuickEval:
    """Holds the classifier and the real test-set features. `per_class` images per class, the
    prompt phrasing cycling over the class's captions, seeds 0..N-1. Images are generated and
    decoded on `device` (the decoder is moved there; the models given to evaluate must be there
    too), prompts and noise are made on the CPU, the classifier runs on the CPU."""

    def __init__(self, decoder, scaling_factor, per_class=100, subset_test=0, device="cpu"):
        self.device = device
        self.decoder = decoder.to(device).eval()
        self.scaling_factor = scaling_factor
        self.classifier = clf.load_classifier(CLASSIFIER_CHECKPOINT)
        test_images, test_labels = fashion_data.load_split("test")
        if subset_test:
            test_images, test_labels = test_images[:subset_test], test_labels[:subset_test]
        self.real_labels = test_labels
        _, self.real_features = clf.embed_images(self.classifier, test_images)
        self.real_mean_pixel = float(test_images.mean())
        self.labels = torch.arange(10).repeat_interleave(per_class)
        phrasing = torch.arange(len(self.labels)) % 7
        self.ids = captions.tokenize([captions.CAPTIONS[int(c)][int(p)]
                                      for c, p in zip(self.labels, phrasing)])
        gen = torch.Generator().manual_seed(1234)
        self.noise = torch.randn((len(self.labels), t2i.LATENT_CHANNELS, 8, 8), generator=gen)
        self.empty_ids = captions.tokenize([""])[0].to(device)
        self.schedule = t2i.Schedule(device=device)

    @torch.no_grad()
    def images(self, unet, text_encoder, steps, guidance, batch_size=250):
        """uint8 [N, 32, 32] CPU tensor of generated images."""
        out = []
        for i in range(0, len(self.labels), batch_size):
            x0 = common.sample(unet, text_encoder, self.ids[i:i + batch_size].to(self.device),
                               self.noise[i:i + batch_size].to(self.device), steps, guidance,
                               self.schedule, self.empty_ids)
            out.append(self.decode(x0))
        return torch.cat(out)

    def evaluate(self, unet, text_encoder, steps=1, guidance=1.0):
        return self.score(self.images(unet, text_encoder, steps, guidance), self.labels.numpy())

    @torch.no_grad()
    def decode(self, latents):
        """uint8 [N, 32, 32] CPU tensor of the images of scaled latents float[N, 4, 8, 8]."""
        x = self.decoder(latents.to(self.device) / self.scaling_factor)
        return common.to_uint8(x)[:, 0].cpu()

    def score(self, images, labels):
        """FID, class accuracy and diversity of uint8 images [N, 32, 32] prompted with integer
        labels [N], against the real test set, and their mean pixel."""
        logits, features = clf.embed_images(self.classifier, images)
        return {
            "fid": metrics.frechet_distance(features, self.real_features),
            "class_accuracy": metrics.class_accuracy(logits.argmax(1), labels),
            "diversity_ratio": metrics.diversity_ratio(features, labels, self.real_features,
                                                       self.real_labels)["mean"],
            "mean_pixel": float(images.float().mean()),
            "real_mean_pixel": self.real_mean_pixel,
        }


def reconstruction(count, autoencoder=common.AUTOENCODER_CHECKPOINT, seed=0):
    """Scores `count` real test images after an encode (posterior mean) + decode round trip, and
    the same images untouched, each against the other 10000 - count test images (the split of
    evaluate_served's real floor). Returns {"real": scores, "reconstructed": scores}."""
    model, _ = common.load_autoencoder(autoencoder)
    classifier = clf.load_classifier(CLASSIFIER_CHECKPOINT)
    images, labels = fashion_data.load_split("test")
    chosen, rest = evaluate_images.real_split(len(images), count, seed)
    with torch.no_grad():
        x = torch.from_numpy(images[chosen].astype(np.float32) / 127.5 - 1.0)[:, None]
        mean, _ = model.encoder(x)
        decoded = common.to_uint8(model.decoder(mean))[:, 0].numpy()
    results = {}
    for name, imgs in (("real", images[chosen]), ("reconstructed", decoded)):
        results[name] = evaluate_images.evaluate(classifier, imgs, labels[chosen], images[rest],
                                                 labels[rest])
        results[name]["mean_pixel"] = float(imgs.mean())
    return results


def pair_targets(evaluator, path):
    """Scores the teacher images an ODE-pair file holds (make_ode_pairs --out: its x0 latents,
    decoded, prompted with its labels) with `evaluator` (a QuickEval); adds the file's sampler."""
    pairs = common.load(path)
    result = evaluator.score(evaluator.decode(pairs["x0"].float()), pairs["labels"].numpy())
    result.update(steps=pairs["steps"], guidance=pairs["guidance"], num_images=len(pairs["x0"]))
    return result


def _row(name, r):
    return (f"| {name} | {r['fid']:.2f} | {r['class_accuracy']:.3f} | "
            f"{r['diversity_ratio']:.3f} | {r['mean_pixel']:.1f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[5:]))
    p.add_argument("--checkpoint", default="",
                   help="teacher.pt or dmd.pt (train_teacher / train_dmd --out)")
    p.add_argument("--steps", type=int, nargs="+", default=[1], help="sampling steps to try")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                   help="CFG scales to try (1 = no guidance)")
    p.add_argument("--per-class", type=int, default=30, help="images per class")
    p.add_argument("--reconstruction", type=int, default=0, metavar="N",
                   help="score N real test images through the autoencoder instead")
    p.add_argument("--pairs", nargs="+", default=[], metavar="FILE",
                   help="score the teacher images of these ODE-pair files instead")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="", help="also write the results here")
    args = p.parse_args(argv)
    if sum(map(bool, (args.checkpoint, args.reconstruction, args.pairs))) != 1:
        p.error("give exactly one of --checkpoint, --reconstruction and --pairs")
    torch.set_num_threads(args.threads)
    print("| images | FID | class accuracy | diversity / real | mean pixel |\n|---|---|---|---|---|")
    results = {}
    if args.reconstruction:
        results = reconstruction(args.reconstruction)
        for name, r in results.items():
            print(_row(f"{name} test images ({args.reconstruction})", r), flush=True)
    elif args.pairs:
        model, scaling_factor = common.load_autoencoder(common.AUTOENCODER_CHECKPOINT)
        evaluator = QuickEval(model.decoder, scaling_factor, per_class=1)
        for path in args.pairs:
            results[path] = r = pair_targets(evaluator, path)
            print(_row(f"{path} ({r['num_images']}, CFG {r['guidance']:g})", r), flush=True)
    else:
        # teacher.pt and dmd.pt hold the text encoder and UNet under the same keys.
        text_encoder, unet = train_teacher.load_checkpoint(args.checkpoint)
        model, scaling_factor = common.load_autoencoder(common.AUTOENCODER_CHECKPOINT)
        evaluator = QuickEval(model.decoder, scaling_factor, args.per_class)
        for steps in args.steps:
            for guidance in args.guidance:
                r = evaluator.evaluate(unet, text_encoder, steps, guidance)
                results[f"steps={steps} guidance={guidance:g}"] = r
                print(_row(f"{steps} steps, guidance {guidance:g}", r), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
