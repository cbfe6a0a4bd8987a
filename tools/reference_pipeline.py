#!/usr/bin/python3
"""Reference implementation of dmdserve's sampling loop, in Python, on a bundle's TorchScript files.

It follows docs/ARCHITECTURE.md (noise contract and sampling loop) with the same tensor operations
in the same order as worker/pipeline.cc, so the C++ pipeline can be checked against it
(worker/pipeline_test.cc). It reads model.json but does not validate it (the C++ loader does).
Both formats of docs/BUNDLE.md: dmdserve.bundle/v1, and v2's second tokenizer ("input_ids_2"),
SDXL's "text_time" conditions (pooled embedding, time ids [H, W, 0, 0, H, W]), zero
unconditional embeddings and initial_noise_scale.

  /usr/bin/python3 -m tools.reference_pipeline --bundle models/tiny-random \
      --inputs-json '[{"input_ids": [49406, 320, 49407, ...], "seed": 7}]' --out images.u8

Writes the images as raw uint8 bytes in [N, height, width, channels] order (no header).
"""

import argparse
import json
import math
import os
from typing import Optional, Tuple

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


def empty_prompt_ids(bundle: str, manifest: dict, tokenizer: str = "tokenizer") -> list:
    """BOS, EOS, then pad to max_length, with ids looked up in the bundle's vocab.json, for the
    manifest's `tokenizer` or `tokenizer_2`."""
    tok = manifest[tokenizer]
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
    return {"manifest": manifest, "dtypes": dtypes, "modules": modules, "bundle": bundle}


def run(bundle: str, inputs: list, width: int, height: int, uncond_ids: list,
        uncond_ids_2: Optional[list] = None) -> torch.Tensor:
    return sample(load(bundle), inputs, width, height, uncond_ids, uncond_ids_2)


def sample(loaded: dict, inputs: list, width: int, height: int, uncond_ids: list,
           uncond_ids_2: Optional[list] = None) -> torch.Tensor:
    """Images [N, height, width, channels] uint8 of `inputs` ({"input_ids", "seed"} each, plus
    "input_ids_2" when the bundle has tokenizer_2) with the modules of load(); safe to call from
    several threads at once. uncond_ids: the empty prompt's ids, used with guidance unless the
    manifest says "unconditional": "zeros"; uncond_ids_2: tokenizer_2's (default: BOS, EOS,
    pad... from the bundle's tokenizer_2 files)."""
    manifest, dtypes, modules = loaded["manifest"], loaded["dtypes"], loaded["modules"]
    schedule = manifest["schedule"]
    timesteps = schedule["timesteps"]
    alphas = schedule["alphas_cumprod"]
    renoise = schedule.get("step_mode", "ddim") == "renoise"
    initial_noise_scale = schedule.get("initial_noise_scale", 1.0)
    epsilon = manifest["prediction_type"] == "epsilon"
    guidance = manifest.get("guidance_scale", 1.0)
    cfg = guidance > 1.0
    # dmdserve.bundle/v2 (docs/BUNDLE.md): a second tokenizer, SDXL's added conditions.
    two_tokenizers = "tokenizer_2" in manifest
    text_time = manifest.get("conditioning", "text") == "text_time"
    zero_uncond = manifest.get("unconditional", "empty_prompt") == "zeros"
    factor = manifest["latent"]["downsample_factor"]
    shape = [manifest["latent"]["channels"], height // factor, width // factor]
    batch = len(inputs)

    # Noise contract: one CPU generator per image, seeded with the image's seed.
    gens = [torch.Generator().manual_seed(item["seed"]) for item in inputs]

    def noise() -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])

    def encode(ids: list, ids_2: list) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(hidden states, pooled embedding or None) of the text encoder on these rows."""
        args = [torch.tensor(ids, dtype=torch.int64)]
        if two_tokenizers:
            args.append(torch.tensor(ids_2, dtype=torch.int64))
        out = modules["text_encoder"](*args)
        if text_time:
            return out[0], out[1]
        return first_tensor(out), None

    with torch.inference_mode():
        z = noise()
        if initial_noise_scale != 1.0:
            z = z * initial_noise_scale
        # The text encoder runs once per distinct prompt (both id lists), in order of first
        # appearance.
        unique, rows = [], []
        for item in inputs:
            key = (item["input_ids"], item.get("input_ids_2"))
            if key not in unique:
                unique.append(key)
            rows.append(unique.index(key))
        te_out, pooled = encode([k[0] for k in unique], [k[1] for k in unique])
        index = torch.tensor(rows, dtype=torch.int64)
        emb = te_out.index_select(0, index)
        emb = emb.to(dtypes["generator"])
        if pooled is not None:
            pooled = pooled.index_select(0, index).to(dtypes["generator"])
        if cfg:
            if zero_uncond:
                uncond = torch.zeros_like(emb[:1])
                uncond_pooled = None if pooled is None else torch.zeros_like(pooled[:1])
            else:
                if two_tokenizers and uncond_ids_2 is None:
                    uncond_ids_2 = empty_prompt_ids(loaded["bundle"], manifest, "tokenizer_2")
                uncond, uncond_pooled = encode([uncond_ids], [uncond_ids_2])
                uncond = uncond.to(dtypes["generator"])
                if uncond_pooled is not None:
                    uncond_pooled = uncond_pooled.to(dtypes["generator"])
            emb = torch.cat([uncond.expand(batch, -1, -1), emb])
            if pooled is not None:
                pooled = torch.cat([uncond_pooled.expand(batch, -1), pooled])
        # SDXL's time ids: original size, crop top-left, target size (height first).
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
        time_ids = time_ids.to(dtypes["generator"]).expand(emb.size(0), -1)

        for k, t in enumerate(timesteps):
            a = alphas[k]
            z_in = torch.cat([z, z]) if cfg else z
            t_in = torch.full([z_in.size(0)], t, dtype=torch.int64)
            if text_time:
                pred = modules["generator"](z_in.to(dtypes["generator"]), t_in, emb, pooled,
                                            time_ids)
            else:
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
                        help='JSON list of {"input_ids": [max_length ints], "seed": int}, '
                             'with "input_ids_2" (tokenizer_2\'s ids) for a bundle that has '
                             'tokenizer_2')
    parser.add_argument("--width", type=int, default=0, help="pixels; 0: the default size")
    parser.add_argument("--height", type=int, default=0, help="pixels; 0: the default size")
    parser.add_argument("--uncond-input-ids-json", default="",
                        help="input_ids of the empty prompt (CFG); default: BOS, EOS, pad... "
                             "from the bundle's vocab.json")
    parser.add_argument("--uncond-input-ids-2-json", default="",
                        help="tokenizer_2's input_ids of the empty prompt (CFG with tokenizer_2 "
                             "and \"unconditional\": \"empty_prompt\"); default: BOS, EOS, "
                             "pad... from the bundle's tokenizer_2 vocab.json")
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
    uncond_ids_2 = (json.loads(args.uncond_input_ids_2_json) if args.uncond_input_ids_2_json
                    else None)
    pixels = run(args.bundle, json.loads(args.inputs_json), width, height, uncond_ids,
                 uncond_ids_2)
    with open(args.out, "wb") as f:
        f.write(pixels.numpy().tobytes())


if __name__ == "__main__":
    main()
