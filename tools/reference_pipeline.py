#!/usr/bin/python3
"""Reference implementation of dmdserve's sampling loop, in Python, on a bundle's TorchScript files.

It follows docs/ARCHITECTURE.md (noise contract and sampling loop) with the same tensor operations
in the same order as worker/pipeline.cc, so the C++ pipeline can be checked against it
(worker/pipeline_test.cc). It reads model.json but does not validate it (the C++ loader does).

  /usr/bin/python3 -m tools.reference_pipeline --bundle models/tiny-random \
      --inputs-json '[{"input_ids": [49406, 320, 49407, ...], "seed": 7}]' --out images.u8

Writes the images as raw uint8 bytes in [N, height, width, channels] order (no header).
"""

import argparse
import json
import math
import os

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COMPONENTS = ("text_encoder", "generator", "decoder")


def component_dtypes(manifest: dict) -> dict:
    spec = manifest.get("dtype", "float32")
    if isinstance(spec, str):
        return {c: DTYPES[spec] for c in COMPONENTS}
    return {c: DTYPES[spec.get(c, "float32")] for c in COMPONENTS}


def first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def empty_prompt_ids(bundle: str, manifest: dict) -> list:
    """BOS, EOS, then pad to max_length, with ids looked up in the bundle's vocab.json."""
    tok = manifest["tokenizer"]
    with open(os.path.join(bundle, tok["vocab"]), encoding="utf-8") as f:
        vocab = json.load(f)
    length = tok.get("max_length", 77)
    bos = vocab[tok.get("bos_token", "<|startoftext|>")]
    eos = vocab[tok.get("eos_token", "<|endoftext|>")]
    pad = vocab[tok.get("pad_token", "<|endoftext|>")]
    return [bos, eos] + [pad] * (length - 2)


def load(bundle: str) -> dict:
    """The bundle's manifest, component dtypes and TorchScript modules, for sample(). Loading
    once and sampling many times is how a server would use it (scripts/bench/python_peer.py)."""
    with open(os.path.join(bundle, "model.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    dtypes = component_dtypes(manifest)
    modules = {}
    for c in COMPONENTS:
        module = torch.jit.load(os.path.join(bundle, manifest["components"][c])).eval()
        modules[c] = module.to(dtypes[c])
    return {"manifest": manifest, "dtypes": dtypes, "modules": modules}


def run(bundle: str, inputs: list, width: int, height: int, uncond_ids: list) -> torch.Tensor:
    return sample(load(bundle), inputs, width, height, uncond_ids)


def sample(loaded: dict, inputs: list, width: int, height: int, uncond_ids: list) -> torch.Tensor:
    """Images [N, height, width, channels] uint8 of `inputs` ({"input_ids", "seed"} each) with
    the modules of load(); safe to call from several threads at once."""
    manifest, dtypes, modules = loaded["manifest"], loaded["dtypes"], loaded["modules"]
    schedule = manifest["schedule"]
    timesteps = schedule["timesteps"]
    alphas = schedule["alphas_cumprod"]
    renoise = schedule.get("step_mode", "ddim") == "renoise"
    epsilon = manifest["prediction_type"] == "epsilon"
    guidance = manifest.get("guidance_scale", 1.0)
    cfg = guidance > 1.0
    factor = manifest["latent"]["downsample_factor"]
    shape = [manifest["latent"]["channels"], height // factor, width // factor]
    batch = len(inputs)

    # Noise contract: one CPU generator per image, seeded with the image's seed.
    gens = [torch.Generator().manual_seed(item["seed"]) for item in inputs]

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])

    with torch.inference_mode():
        z = noise()
        # The text encoder runs once per distinct prompt, in order of first appearance.
        unique, rows = [], []
        for item in inputs:
            if item["input_ids"] not in unique:
                unique.append(item["input_ids"])
            rows.append(unique.index(item["input_ids"]))
        te_out = first_tensor(modules["text_encoder"](torch.tensor(unique, dtype=torch.int64)))
        emb = te_out.index_select(0, torch.tensor(rows, dtype=torch.int64))
        emb = emb.to(dtypes["generator"])
        if cfg:
            uncond = first_tensor(modules["text_encoder"](torch.tensor([uncond_ids],
                                                                       dtype=torch.int64)))
            uncond = uncond.to(dtypes["generator"])
            emb = torch.cat([uncond.expand(batch, -1, -1), emb])

        for k, t in enumerate(timesteps):
            a = alphas[k]
            z_in = torch.cat([z, z]) if cfg else z
            t_in = torch.full([z_in.size(0)], t, dtype=torch.int64)
            pred = modules["generator"](z_in.to(dtypes["generator"]), t_in, emb)
            pred = pred.to(torch.float32)
            if cfg:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + (pred_cond - pred_uncond) * guidance
            x0 = (z - pred * math.sqrt(1 - a)) / math.sqrt(a) if epsilon else pred
            if k + 1 == len(timesteps):
                break
            eps = noise() if renoise else (z - x0 * math.sqrt(a)) / math.sqrt(1 - a)
            a_next = alphas[k + 1]
            z = x0 * math.sqrt(a_next) + eps * math.sqrt(1 - a_next)

        scaled = x0 / manifest["latent_scaling_factor"]
        image = modules["decoder"](scaled.to(dtypes["decoder"])).to(torch.float32)
        pixels = ((image + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", required=True, help="bundle directory (holds model.json)")
    parser.add_argument("--inputs-json", required=True,
                        help='JSON list of {"input_ids": [max_length ints], "seed": int}')
    parser.add_argument("--width", type=int, default=0, help="pixels; 0: the default size")
    parser.add_argument("--height", type=int, default=0, help="pixels; 0: the default size")
    parser.add_argument("--uncond-input-ids-json", default="",
                        help="input_ids of the empty prompt (CFG); default: BOS, EOS, pad... "
                             "from the bundle's vocab.json")
    parser.add_argument("--out", required=True, help="output file: raw uint8 [N, H, W, C]")
    args = parser.parse_args()

    with open(os.path.join(args.bundle, "model.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    width = args.width or manifest["image"]["width"]
    height = args.height or manifest["image"]["height"]
    if args.uncond_input_ids_json:
        uncond_ids = json.loads(args.uncond_input_ids_json)
    else:
        uncond_ids = empty_prompt_ids(args.bundle, manifest)
    pixels = run(args.bundle, json.loads(args.inputs_json), width, height, uncond_ids)
    with open(args.out, "wb") as f:
        f.write(pixels.numpy().tobytes())


if __name__ == "__main__":
    main()
