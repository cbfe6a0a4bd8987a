"""Evaluates the Fashion-MNIST models through the real server: starts build/server/dmdserve on the
DMD bundle, the 50-step teacher bundle and teacher variants with 20, 4 and 1 steps, generates the
images with dmdctl, scores them with the committed classifier (training/eval), measures speed
side by side with `dmdctl bench`, and makes the sample grids.

  /usr/bin/python3 -m training.evaluate_served --out /tmp/fashion-eval \
      --json training/checkpoints/eval_served.json --grids docs/images

Images: for each model and class, --requests requests of 16 images (prompt phrasings in turn,
seeds 1000000 + 10000 * class + 16 * request, the same for every model). FID is against the
10,000 test images; the floor is real test images of the same count (evaluate_images --real-test).
"""

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from tools import bundle_files
from tools.dmdserve_process import DmdserveProcess
from training import captions, export_fashion_bundle
from training.eval import evaluate_images, fashion_data
from training.eval.classifier import load_classifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES_PER_REQUEST = 16
TEACHER_VARIANT_STEPS = (20, 4, 1)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--build-dir", default=os.path.join(REPO, "build"))
    p.add_argument("--dmd", default=os.path.join(REPO, "models", "fashion-dmd"))
    p.add_argument("--teacher", default=os.path.join(REPO, "models", "fashion-teacher"))
    p.add_argument("--requests", type=int, default=13, help="requests of 16 images per class")
    p.add_argument("--parallel", type=int, default=4, help="dmdctl processes at once")
    p.add_argument("--bench-seconds", type=float, default=10)
    p.add_argument("--out", default="/tmp/fashion-eval", help="scratch directory for images")
    p.add_argument("--json", default="", help="write the results here")
    p.add_argument("--grids", default="", help="write <model>-grid.png sample grids here")
    p.add_argument("--skip-teacher-variants", action="store_true")
    return p.parse_args(argv)


def teacher_variant(teacher_dir, steps, root):
    """A bundle directory sharing the teacher's files with an N-step schedule."""
    with open(os.path.join(teacher_dir, bundle_files.MANIFEST)) as f:
        manifest = json.load(f)
    out = os.path.join(root, f"fashion-teacher-{steps}")
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(teacher_dir):
        if name != bundle_files.MANIFEST:
            os.symlink(os.path.abspath(os.path.join(teacher_dir, name)), os.path.join(out, name))
    manifest["name"] = f"fashion-teacher-{steps}"
    manifest["description"] = f"fashion-teacher with {steps} DDIM steps (evaluation only)"
    manifest["schedule"] = export_fashion_bundle.schedule(steps)
    bundle_files.write_manifest(out, manifest)
    return out


def dmdctl(build_dir, target, *args):
    cmd = [os.path.join(build_dir, "client", "dmdctl"), f"--target={target}", "--timeout_s=300",
           *args]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {result.stderr.strip()}")
    return result.stdout


def generate_set(args, target, model, out_dir):
    """Generates the evaluation images of one model into out_dir; returns the wall time."""
    os.makedirs(out_dir, exist_ok=True)
    jobs = []
    for label in range(10):
        for r in range(args.requests):
            prompt = captions.CAPTIONS[label][r % len(captions.CAPTIONS[label])]
            seed = 1_000_000 + 10_000 * label + IMAGES_PER_REQUEST * r
            jobs.append(("generate", f"--model={model}", f"--num_images={IMAGES_PER_REQUEST}",
                         f"--seed={seed}", f"--out_dir={out_dir}", f"--prefix={label}-r{r}",
                         prompt))
    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda job: dmdctl(args.build_dir, target, *job), jobs))
    return time.time() - start


def bench(args, target, model, concurrency):
    out = dmdctl(args.build_dir, target, "bench", f"--model={model}",
                 f"--concurrency={concurrency}", f"--duration_s={args.bench_seconds}", "--json")
    return json.loads(out)


def grid(args, target, model, path, seeds=8):
    """10 classes (rows, phrasing 1: "a photo of ...") x `seeds` seeds, 3x upscaled."""
    tmp = tempfile.mkdtemp()
    rows = []
    for label in range(10):
        dmdctl(args.build_dir, target, "generate", f"--model={model}", f"--num_images={seeds}",
               "--seed=0", f"--out_dir={tmp}", f"--prefix=c{label}",
               captions.CAPTIONS[label][1])
        rows.append(np.concatenate([np.asarray(Image.open(
            os.path.join(tmp, f"c{label}-{i}-seed{i}.png")).convert("L")) for i in range(seeds)],
            axis=1))
    shutil.rmtree(tmp)
    image = Image.fromarray(np.concatenate(rows, axis=0))
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(path)


def main(args):
    torch.set_num_threads(1)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    models = {"fashion-dmd": args.dmd, "fashion-teacher": args.teacher}
    if not args.skip_teacher_variants:
        for steps in TEACHER_VARIANT_STEPS:
            models[f"fashion-teacher-{steps}"] = teacher_variant(args.teacher, steps,
                                                                 os.path.join(args.out, "bundles"))
    server = DmdserveProcess(os.path.join(args.build_dir, "server", "dmdserve"),
                             list(models.values()), ["--default_model=fashion-dmd"],
                             log_path=os.path.join(args.out, "server.log"))
    results = {"models": {}}
    try:
        server.wait_ready(300)
        classifier = load_classifier(evaluate_images.DEFAULT_CHECKPOINT)
        test_images, test_labels = fashion_data.load_split("test")
        for model in models:
            directory = os.path.join(args.out, model)
            wall = generate_set(args, server.target, model, directory)
            images, labels, _ = evaluate_images.load_image_dir(directory)
            scores = evaluate_images.evaluate(classifier, images, labels, test_images,
                                              test_labels)
            scores["generation_wall_s"] = round(wall, 1)
            scores["mean_pixel"] = float(images.mean())
            results["models"][model] = scores
            print(f"{model}: FID {scores['fid']:.2f} accuracy {scores['class_accuracy']:.3f} "
                  f"diversity {scores['diversity_ratio']:.3f} ({len(images)} images, "
                  f"{wall:.0f} s)", flush=True)
        count = len(images)
        chosen, rest = evaluate_images.real_split(len(test_images), count)
        floor = evaluate_images.evaluate(classifier, test_images[chosen], test_labels[chosen],
                                         test_images[rest], test_labels[rest])
        floor["mean_pixel"] = float(test_images.mean())
        results["real_floor"] = floor
        print(f"real floor ({count} images): FID {floor['fid']:.2f}", flush=True)
        results["speed"] = {}
        for model in ("fashion-teacher", "fashion-dmd"):
            results["speed"][model] = {f"c{c}": bench(args, server.target, model, c)
                                       for c in (1, 16)}
        if args.grids:
            os.makedirs(args.grids, exist_ok=True)
            for model in ("fashion-teacher", "fashion-dmd"):
                grid(args, server.target, model, os.path.join(args.grids, f"{model}-grid.png"))
    finally:
        server.stop()
    results["images_per_model"] = count
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(markdown(results))
    return 0


def markdown(results):
    """The results as the Markdown tables of docs/FASHION.md."""
    lines = ["| images from | FID (classifier features) | class accuracy | diversity / real | "
             "mean pixel |", "|---|---|---|---|---|"]
    floor = results["real_floor"]
    lines.append(f"| real test images (floor) | {floor['fid']:.2f} | "
                 f"{floor['class_accuracy']:.3f} | {floor['diversity_ratio']:.3f} | "
                 f"{floor['mean_pixel']:.1f} |")
    for model, r in results["models"].items():
        lines.append(f"| {model} | {r['fid']:.2f} | {r['class_accuracy']:.3f} | "
                     f"{r['diversity_ratio']:.3f} | {r['mean_pixel']:.1f} |")
    lines += ["", "| model | batch-1 p50 latency (c=1) | images/s (c=1) | images/s (c=16) | "
              "p50 / p99 at c=16 |", "|---|---|---|---|---|"]
    for model, runs in results["speed"].items():
        c1, c16 = runs["c1"], runs["c16"]
        lines.append(f"| {model} | {_ms(c1, 'p50')} | {_rate(c1)} | {_rate(c16)} | "
                     f"{_ms(c16, 'p50')} / {_ms(c16, 'p99')} |")
    return "\n".join(lines)


def _ms(bench, key):
    latency = bench.get("latency_seconds") or bench.get("latency") or {}
    value = latency.get(key)
    return "n/a" if value is None else f"{1000 * value:.1f} ms"


def _rate(bench):
    value = bench.get("images_per_second")
    return "n/a" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(main(parse_args()))
