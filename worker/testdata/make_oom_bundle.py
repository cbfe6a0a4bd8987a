#!/usr/bin/python3
"""Copies a model bundle and wraps its text encoder so that one token id makes it allocate 1 PiB.

The allocation really fails (no machine has that much memory; the CPU allocator refuses at once,
a GPU's caching allocator reports "CUDA out of memory"), so tests see libtorch's genuine
out-of-memory error for the batches holding the trigger token, and normal results for all others.

Usage: make_oom_bundle.py --src models/tiny-random --out DIR --trigger-id ID [--name NAME]
"""
import argparse
import json
import os
import shutil

import torch


class AllocatesOnToken(torch.nn.Module):
    def __init__(self, inner: torch.jit.ScriptModule, trigger_id: int):
        super().__init__()
        self.inner = inner
        self.trigger_id = trigger_id
        self.huge_bytes = 2 ** 50

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embedding = self.inner(input_ids)
        if bool((input_ids == self.trigger_id).any()):
            huge = torch.empty([self.huge_bytes], dtype=torch.uint8, device=input_ids.device)
            # Used, so that no optimisation pass drops the allocation.
            embedding = embedding + huge[:1].to(embedding.dtype)
        return embedding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--src", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--trigger-id", type=int, required=True)
    parser.add_argument("--name", default="oom")
    args = parser.parse_args()

    shutil.copytree(args.src, args.out, dirs_exist_ok=True)
    manifest_path = os.path.join(args.out, "model.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["name"] = args.name
    encoder_path = os.path.join(args.out, manifest["components"]["text_encoder"])
    inner = torch.jit.load(encoder_path)
    torch.jit.script(AllocatesOnToken(inner, args.trigger_id)).save(encoder_path)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f, indent=2)


if __name__ == "__main__":
    main()
