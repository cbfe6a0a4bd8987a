"""What every dmdserve bundle writer of this repository writes the same way (docs/BUNDLE.md): the
manifest's schedule block, TorchScript components, the copied tokenizer files and model.json.

Used by tools/sd15/bundle.py (SD1.5 exports), training/export_fashion_bundle.py, the served
evaluation's teacher variants (training/evaluate_served.py) and scripts/make_tiny_bundle.py, so
that their model.json files share one format: json.dump with indent=2 and a final newline.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Sequence

import torch
from torch import nn

from tools.sd15 import schedule

MANIFEST = "model.json"
TOKENIZER_SUBDIR = "tokenizer"


def manifest_schedule(timesteps: List[int], alphas_cumprod: torch.Tensor,
                      step_mode: str = "ddim") -> Dict[str, Any]:
    """A manifest's "schedule" block: the timesteps, alphas_cumprod at each of them (as Python
    floats) and the step mode."""
    return {"timesteps": timesteps,
            "alphas_cumprod": [float(alphas_cumprod[t]) for t in timesteps],
            "step_mode": step_mode}


def dmd2_sd_schedule(steps: int, step_mode: str = "ddim") -> Dict[str, Any]:
    """The schedule block of `steps` DMD2-spaced timesteps (999 - k * (1000 // steps)) on SD's
    scaled-linear schedule: the Fashion-MNIST bundles' and the tiny test bundle's."""
    return manifest_schedule(schedule.dmd2_timesteps(steps),
                             schedule.scaled_linear_alphas_cumprod(), step_mode)


def save_component(module: nn.Module, out_dir: str, filename: str) -> None:
    """torch.jit.script(module) saved as out_dir/filename (module as given: set eval() first)."""
    torch.jit.save(torch.jit.script(module), os.path.join(out_dir, filename))


def copy_tokenizer(tokenizer_dir: str, out_dir: str, files: Sequence[str],
                   optional_files: Sequence[str] = (), subdir: str = TOKENIZER_SUBDIR) -> None:
    """Copies `files` (each must exist) and those of `optional_files` that exist from
    tokenizer_dir into out_dir/subdir (created; default out_dir/tokenizer)."""
    dest = os.path.join(out_dir, subdir)
    os.makedirs(dest, exist_ok=True)
    for name in list(files) + [f for f in optional_files
                               if os.path.isfile(os.path.join(tokenizer_dir, f))]:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(dest, name))


def write_manifest(out_dir: str, manifest: Dict[str, Any]) -> None:
    """Writes out_dir/model.json: `manifest` as JSON (ASCII, indent 2, keys in dict order) and a
    final newline."""
    with open(os.path.join(out_dir, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
