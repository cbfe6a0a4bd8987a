#!/usr/bin/python3
"""Per-component CPU time of a bundle's TorchScript files under load-time variants, interleaved.

Variants (comma-separated; each loads its own copy of the three components):
  base           torch.jit.load + eval(), as dmdserve loads them
  base_cl        + every 4-d weight (convolutions) of the generator and decoder channels-last
  base_deccl     + the decoder's 4-d weights channels-last (Pipeline::Options.channels_last_decoder)
  base_clin      base_cl, and the latent inputs channels-last too
  freeze         torch.jit.freeze
  freeze_cl, freeze_deccl   freeze after the channels-last conversion
  ofi            torch.jit.freeze + torch.jit.optimize_for_inference
Each component runs on random inputs of the bundle's shapes (1 prompt per image, default size).
Every (component, batch size) runs each variant in turn, for several rounds, so that drift on a
shared machine hits them alike; the report gives medians. Outputs are compared with the first
variant's (a line starting with '#' when one differs by more than 1e-4).

Usage: scripts/bench/bench_jit_variants.py --bundle models/fashion-dmd [--threads 1]
           [--variants base,base_deccl,freeze,ofi] [--batch-sizes 1,2,4,8,16] [--rounds 5]
Run it with glibc's thresholds as dmdserve sets them (worker/malloc_tuning.h), or batch 16 pays
for page faults: MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=268435456.
"""
import argparse
import json
import os
import statistics
import time

import torch

COMPONENTS = ["text_encoder", "generator", "decoder"]


def load(bundle, manifest, name, variant):
    module = torch.jit.load(os.path.join(bundle, manifest["components"][name])).eval()
    parts = variant.split("_")
    if ("cl" in parts or "clin" in parts) and name != "text_encoder" or (
            "deccl" in parts and name == "decoder"):
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() == 4:
                    p.data = p.data.contiguous(memory_format=torch.channels_last)
    if parts[0] in ("freeze", "ofi"):
        module = torch.jit.freeze(module)
    if parts[0] == "ofi":
        module = torch.jit.optimize_for_inference(module)
    return module


def make_inputs(manifest, name, batch, embed_dim, variant):
    g = torch.Generator().manual_seed(batch)
    length = manifest["tokenizer"]["max_length"]
    if name == "text_encoder":
        return (torch.randint(0, 1000, (batch, length), generator=g),)
    f = manifest["latent"]["downsample_factor"]
    z = torch.randn(batch, manifest["latent"]["channels"], manifest["image"]["height"] // f,
                    manifest["image"]["width"] // f, generator=g)
    if variant.endswith("_clin"):
        z = z.contiguous(memory_format=torch.channels_last)
    if name == "decoder":
        return (z,)
    return (z, torch.full((batch,), 999, dtype=torch.long),
            torch.randn(batch, length, embed_dim, generator=g))


def seconds_per_call(module, args, min_s=0.12):
    module(*args)
    n, start = 0, time.perf_counter()
    while True:
        module(*args)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed > min_s and n >= 2:
            return elapsed / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default="base,base_deccl,freeze,ofi")
    parser.add_argument("--batch-sizes", default="1,2,4,8,16")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = args.variants.split(",")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    with open(os.path.join(args.bundle, "model.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with torch.inference_mode():
        length = manifest["tokenizer"]["max_length"]
        embed_dim = load(args.bundle, manifest, "text_encoder", "base")(
            torch.zeros(1, length, dtype=torch.long)).shape[-1]
        modules = {(v, c): load(args.bundle, manifest, c, v) for v in variants for c in COMPONENTS}
        reference = {}
        for c in COMPONENTS:  # warm-up (the profiling executor's runs) and numerics check
            for b in batches:
                for v in variants:
                    inputs = make_inputs(manifest, c, b, embed_dim, v)
                    for _ in range(3):
                        out = modules[(v, c)](*inputs)
                    if v == variants[0]:
                        reference[(c, b)] = out
                        continue
                    diff = (out.float() - reference[(c, b)].float()).abs().max().item()
                    if diff > 1e-4:
                        print(f"# {v} {c} batch {b}: max abs diff vs {variants[0]} {diff:.2e}")
        times = {}
        for _ in range(args.rounds):
            for c in COMPONENTS:
                for b in batches:
                    for v in variants:
                        inputs = make_inputs(manifest, c, b, embed_dim, v)
                        times.setdefault((v, c, b), []).append(
                            seconds_per_call(modules[(v, c)], inputs))
    print(f"bundle {args.bundle}, {args.threads} intra-op thread(s), "
          f"median of {args.rounds} rounds")
    print("| batch | variant | text_encoder ms | generator ms | decoder ms | sum ms | images/s |")
    print("|---|---|---|---|---|---|---|")
    for b in batches:
        first = None
        for v in variants:
            ms = [statistics.median(times[(v, c, b)]) * 1e3 for c in COMPONENTS]
            first = first or sum(ms)
            print(f"| {b} | {v} | " + " | ".join(f"{t:.2f}" for t in ms) +
                  f" | {sum(ms):.2f} | {b / sum(ms) * 1e3:.0f} ({first / sum(ms):.2f}x) |")


if __name__ == "__main__":
    main()
