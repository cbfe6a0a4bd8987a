"""Reading checkpoint files without extra packages, and strict state-dict loading.

Formats:
- `.safetensors`: 8-byte little-endian header length N, N bytes of UTF-8 JSON
  (`{"__metadata__": {str: str}, "<name>": {"dtype", "shape", "data_offsets": [begin, end]}}`),
  then the raw little-endian data; offsets are relative to the data start. Parsed here with
  bounds, size and coverage checks (the tensors must tile the data buffer exactly, as the format
  requires), memory-mapped copy-on-write so a multi-GB file is not read twice.
- `.bin` / `.pt` / `.pth`: torch.save zip files (an OrderedDict state dict, as diffusers,
  transformers and DMD2 write them), read with torch.load(weights_only=True): no arbitrary
  pickled code runs.
Every problem raises CheckpointError naming the file and the offending entry.
"""

import inspect
import json
import mmap
import os
import sys
from typing import Dict, Iterable, List, Mapping, Tuple

import torch
from torch import nn

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# The safetensors format caps the header at 100 MB; a larger length means a corrupt file.
MAX_HEADER_BYTES = 100_000_000
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
REPORT_LIMIT = 5  # names listed per kind of mismatch in error messages

StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model; the message says why."""


def _fail(path: str, message: str) -> None:
    raise CheckpointError(f"{path}: {message}")


def _reject_duplicates(pairs: List[Tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_safetensors_header(path: str, header: bytes, data_len: int) -> Dict[str, tuple]:
    """Validated {name: (dtype, shape, begin, end)} in header order."""
    try:
        entries = json.loads(header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        _fail(path, f"safetensors header is not valid UTF-8 JSON: {e}")
    if not isinstance(entries, dict):
        _fail(path, "safetensors header must be a JSON object")
    metadata = entries.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        _fail(path, "safetensors __metadata__ must map strings to strings")
    tensors = {}
    for name, info in entries.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            _fail(path, f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            _fail(path, f"{where}: unsupported dtype {info['dtype']!r} "
                        f"(supported: {', '.join(SAFETENSORS_DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            _fail(path, f"{where}: shape must be a list of non-negative ints, got {shape!r}")
        offsets = info["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_count(o) for o in offsets)):
            _fail(path, f"{where}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_len:
            _fail(path, f"{where}: data_offsets {offsets} out of bounds of the "
                        f"{data_len}-byte data buffer")
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            _fail(path, f"{where}: data_offsets {offsets} hold {end - begin} bytes, but "
                        f"{info['dtype']} {shape} needs {expected}")
        tensors[name] = (dtype, shape, begin, end)
    # The tensors must tile the data buffer: no overlap, no gap, nothing after the last one.
    position = 0
    for name, (_, _, begin, end) in sorted(tensors.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < position:
            _fail(path, f"tensor {name!r}: data_offsets [{begin}, {end}] overlap another tensor")
        if begin > position:
            _fail(path, f"tensor {name!r}: gap of {begin - position} bytes before its data")
        position = end
    if position != data_len:
        _fail(path, f"{data_len - position} bytes after the last tensor are not covered by "
                    "the header")
    return tensors


def read_safetensors(path: str) -> StateDict:
    """All tensors of a .safetensors file, in header order, on the CPU."""
    if sys.byteorder != "little":
        _fail(path, "reading safetensors needs a little-endian host")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                _fail(path, f"file is {size} bytes, too short for a safetensors header length")
            header_len = int.from_bytes(prefix, "little")
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                _fail(path, f"header length {header_len} exceeds the file ({size} bytes) or the "
                            f"{MAX_HEADER_BYTES}-byte limit")
            header = f.read(header_len)
            data_start = 8 + header_len
            tensors = _parse_safetensors_header(path, header, size - data_start)
            # Copy-on-write mapping: writable (torch.frombuffer wants that), never written back.
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if tensors else None
    except OSError as e:
        _fail(path, f"cannot read: {e}")
    out = {}
    for name, (dtype, shape, begin, end) in tensors.items():
        if begin == end:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        itemsize = torch.empty((), dtype=dtype).element_size()
        offset = data_start + begin
        if offset % itemsize:  # unaligned: copy the bytes so every element is aligned
            flat = torch.frombuffer(bytearray(mapped[offset:data_start + end]), dtype=dtype)
        else:
            flat = torch.frombuffer(mapped, dtype=dtype, count=(end - begin) // itemsize,
                                    offset=offset)
        out[name] = flat.reshape(shape)
    return out


def _torch_load_supports_weights_only() -> bool:
    return "weights_only" in inspect.signature(torch.load).parameters


def read_torch_file(path: str) -> StateDict:
    """A torch.save'd state dict (name -> tensor), loaded with weights_only where the installed
    torch supports it (1.13 and later)."""
    kwargs = {"weights_only": True} if _torch_load_supports_weights_only() else {}
    try:
        obj = torch.load(path, map_location="cpu", **kwargs)
    except FileNotFoundError:
        _fail(path, "no such file")
    except Exception as e:  # torch.load raises many types (RuntimeError, UnpicklingError, ...)
        _fail(path, f"not a readable torch checkpoint: {type(e).__name__}: {e}")
    if not isinstance(obj, Mapping):
        _fail(path, f"expected a state dict (name -> tensor), got {type(obj).__name__}")
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            _fail(path, f"expected a state dict (name -> tensor), but entry {name!r} is a "
                        f"{type(value).__name__}")
    return dict(obj)


def read_state_dict(path: str) -> StateDict:
    """Dispatch on the file name: .safetensors or a torch.save file (.bin, .pt, .pth)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(TORCH_SUFFIXES):
        return read_torch_file(path)
    _fail(path, "unknown checkpoint format (expected .safetensors, .bin, .pt or .pth)")


def _examples(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:REPORT_LIMIT])
    return shown + (f", ... ({len(names) - REPORT_LIMIT} more)" if len(names) > REPORT_LIMIT
                    else "")


def mismatch_report(expected: Mapping[str, Tuple[int, ...]], state_dict: StateDict) -> str:
    """Empty when state_dict has exactly the expected names and shapes; otherwise a message
    listing a few missing, unexpected and wrongly shaped entries."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [f"{k} {list(state_dict[k].shape)} (model: {list(expected[k])})"
             for k in expected if k in state_dict
             and tuple(state_dict[k].shape) != tuple(expected[k])]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {_examples(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys: {_examples(unexpected)}")
    if wrong:
        parts.append(f"{len(wrong)} shape mismatches: {_examples(wrong)}")
    return "; ".join(parts)


def key_shapes(module: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of a module's state dict, in state_dict() order (works on 'meta' modules)."""
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def load_strict(module: nn.Module, state_dict: StateDict, what: str) -> nn.Module:
    """Loads state_dict into module with exact key and shape matching; tensors are converted to
    the module's dtype. A module built on the 'meta' device is materialised on the CPU first."""
    report = mismatch_report(key_shapes(module), state_dict)
    if report:
        raise CheckpointError(f"{what}: state dict does not match the model: {report}")
    if any(p.is_meta for p in module.parameters()):
        module.to_empty(device="cpu")
    module.load_state_dict(state_dict, strict=True)
    return module
