"""Shared helpers of the tools/ tests: fixture paths and an independent DMD2 reference.

The fixtures live in tools/tests/testdata (its README.md says what each file is and where it
comes from) and worker/testdata (the CLIP tokenizer reference vectors).
"""

import collections
import contextlib
import io
import json
import math
import os

import torch

from tools import reference_pipeline as reference_pipeline_module

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARITY = os.path.join(REPO_ROOT, "tools", "tests", "testdata", "sd-parity")
SDXL_PARITY = os.path.join(REPO_ROOT, "tools", "tests", "testdata", "sdxl-parity")
TINY_FOLDER = os.path.join(PARITY, "tiny-sd15-diffusers")
DMD_REPLACEMENT = os.path.join(TINY_FOLDER, "unet_dmd_replacement.bin")
TINY_SDXL = os.path.join(SDXL_PARITY, "tiny-sdxl-diffusers")
SDXL_DMD_REPLACEMENT = os.path.join(TINY_SDXL, "unet_dmd_replacement.bin")
CLIP_VOCAB = os.path.join(REPO_ROOT, "models", "tokenizers", "openai-clip")
# The SDXL text fixtures' three prompts (sdxl-parity README), in input_ids row order.
SDXL_PROMPTS = ["a photo of a cat",
                "an astronaut riding a horse on the moon, 4k, highly detailed", ""]
SDXL_WEIGHT_FILES = {"unet": "diffusion_pytorch_model.bin", "text_encoder": "pytorch_model.bin",
                     "text_encoder_2": "pytorch_model.bin"}
TOKENIZER_VECTORS = os.path.join(REPO_ROOT, "worker", "testdata",
                                 "clip_tokenizer_reference_vectors.jsonl")

# From the tiny folder's scheduler config (SD1.5's): alphas_cumprod[999] of SD1.5's scheduler in
# float32, and the VAE's scaling factor.
SD15_ALPHA_999 = 0.0046600960195064545
SD15_SCALING = 0.18215


def fixture(component: str, name: str, root: str = PARITY) -> dict:
    """A .pt fixture of `root` (sd-parity by default, or SDXL_PARITY)."""
    return torch.load(os.path.join(root, component, name))


def fixture_json(component: str, name: str, root: str = PARITY) -> dict:
    with open(os.path.join(root, component, name), encoding="utf-8") as f:
        return json.load(f)


def key_list(name: str, root: str = PARITY) -> list:
    """[(key, shape tuple)] of a `<key> [d0,d1,...]` key list file, in file order."""
    out = []
    with open(os.path.join(root, name), encoding="utf-8") as f:
        for line in f:
            key, shape = line.split()
            dims = shape.strip("[]")
            out.append((key, tuple(int(d) for d in dims.split(",")) if dims else ()))
    return out


def save_state_dict(sd: dict, path: str) -> None:
    """As diffusers/transformers write .bin files: torch.save of an OrderedDict."""
    torch.save(collections.OrderedDict(sd), path)


def build_sdxl_folder(tmp: str, skip=(), text_encoder_extra=None) -> str:
    """The complete tiny SDXL diffusers folder in tmp/folder, without the relative paths in
    `skip`; text_encoder_extra: tensors added to text_encoder's file.

    The repository keeps only the folder's configs, tokenizer configs and stand-in DMD2 UNet
    (tools/tests/testdata/README.md); the rest is assembled here: the weights of unet/,
    text_encoder/ and text_encoder_2/ are the parity fixtures' weights.pt (the reference
    folder's files hold exactly those tensors), the VAE is the SD1.5 tiny folder's
    (byte-identical files), and vocab.json/merges.txt are models/tokenizers/openai-clip's
    (identical files)."""
    root = os.path.join(tmp, "folder")
    for dirpath, _, files in os.walk(TINY_SDXL):
        for name in files:
            rel = os.path.relpath(os.path.join(dirpath, name), TINY_SDXL)
            if rel == "unet_dmd_replacement.bin" or rel in skip:
                continue
            os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
            os.symlink(os.path.join(dirpath, name), os.path.join(root, rel))
    for tokenizer in ("tokenizer", "tokenizer_2"):
        for name in ("vocab.json", "merges.txt"):
            rel = os.path.join(tokenizer, name)
            if rel not in skip:
                os.symlink(os.path.join(CLIP_VOCAB, name), os.path.join(root, rel))
    vae = os.path.join("vae", "diffusion_pytorch_model.safetensors")
    if vae not in skip:
        os.makedirs(os.path.join(root, "vae"), exist_ok=True)
        os.symlink(os.path.join(TINY_FOLDER, vae), os.path.join(root, vae))
    for component, name in SDXL_WEIGHT_FILES.items():
        rel = os.path.join(component, name)
        if rel in skip:
            continue
        sd = fixture(component, "weights.pt", root=SDXL_PARITY)
        if component == "text_encoder" and text_encoder_extra:
            sd = {**sd, **text_encoder_extra}
        os.makedirs(os.path.join(root, component), exist_ok=True)
        save_state_dict(sd, os.path.join(root, rel))
    return root


def read_manifest(bundle: str) -> dict:
    """A bundle's model.json."""
    with open(os.path.join(bundle, "model.json"), encoding="utf-8") as f:
        return json.load(f)


def tokenizer_vectors() -> list:
    """The CLIP tokenizer reference vectors: {"text", "input_ids_77", ...} per line."""
    with open(TOKENIZER_VECTORS, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def dmd2_images(text_encoder, unet, vae, items: list, width: int, height: int) -> torch.Tensor:
    """DMD2's one-step SD1.5 sampling written out from its definition, independent of the
    bundle code: noise from a CPU generator seeded with the image's seed (noise contract), one
    UNet evaluation at t = 999, x0 = (z - sqrt(1 - a) eps) / sqrt(a), decode x0 / 0.18215,
    pixels = round(clamp((image + 1) * 127.5)). items: [{"input_ids": [77 ints], "seed": int}].
    Returns uint8 [N, H, W, C]."""
    latents = torch.stack([
        torch.randn([4, height // 8, width // 8],
                    generator=torch.Generator().manual_seed(item["seed"]), dtype=torch.float32)
        for item in items])
    ids = torch.tensor([item["input_ids"] for item in items], dtype=torch.int64)
    a = SD15_ALPHA_999
    with torch.no_grad():
        eps = unet(latents, torch.full([len(items)], 999, dtype=torch.int64), text_encoder(ids))
        x0 = (latents - math.sqrt(1 - a) * eps) / math.sqrt(a)
        image = vae(x0 / SD15_SCALING)
    pixels = ((image + 1) * 127.5).clamp(0, 255).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous()


def run_quietly(main, argv: list):
    """(exit code, stderr text) of a tool's main(argv); argparse errors give code 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def reference_pipeline():
    """tools/reference_pipeline.py (the served sampling loop in Python) as a module."""
    return reference_pipeline_module


class ServedBundlesTestCase:
    """Mixin for the export -> serve round trips: setUpClass fills `cls.bundles` ({name: bundle
    directory}, exported under `cls.tmp`, a TemporaryDirectory) and calls start_server(); the
    server must drain and exit 0 at the end. Needs the integration environment (harness)."""

    @classmethod
    def start_server(cls):
        from harness import Server  # noqa: E402 (tests/integration, on PYTHONPATH under CTest)
        cls.server = Server("--warmup_runs=1", model_dirs=tuple(cls.bundles.values()))

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        cls.tmp.cleanup()
        assert code == 0, cls.server.log()
