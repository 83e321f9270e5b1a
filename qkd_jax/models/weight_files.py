"""Read a weight file into ``{name: np.ndarray}`` (the input of :func:`import_torchvision`).

``.npz`` and ``.safetensors`` are read without torch (the safetensors format is parsed here:
8-byte little-endian header length, a JSON header of dtype / shape / data_offsets per tensor,
then the raw little-endian data); ``.pth`` / ``.pt`` need torch.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Any

import numpy as np

#: safetensors dtype -> little-endian NumPy dtype (BF16 is widened to float32 separately).
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
}


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32: bf16 is the upper half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def load_safetensors(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Tensors of a ``.safetensors`` file (F64/F32/F16/BF16/I64/I32; BF16 becomes float32)."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError(f"{path}: too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if 8 + header_len > len(blob):
        raise ValueError(f"{path}: header length {header_len} runs past the end of the file")
    header: dict[str, Any] = json.loads(blob[8 : 8 + header_len])
    data = memoryview(blob)[8 + header_len :]
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}; supported: {', '.join(_SAFETENSORS_DTYPES)}"
            )
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        if end - begin != math.prod(shape) * dtype.itemsize or end > len(data):
            raise ValueError(f"{path}: tensor {name!r} data_offsets {begin}..{end} do not fit shape {shape}")
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
        out[name] = bf16_to_float32(array) if entry["dtype"] == "BF16" else array.astype(dtype.newbyteorder("="))
    return out


def load_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Arrays of an ``.npz`` file (no pickled objects)."""
    with np.load(path, allow_pickle=False) as f:
        return {name: f[name] for name in f.files}


def load_pth(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """A torch ``state_dict`` file (``torch.save(model.state_dict(), path)``), loaded with ``weights_only``."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs torch (pip install torch), or convert it to .npz / .safetensors"
        ) from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(state).__name__}")
    out = {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        out[name] = (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    return out


def load_weights(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """``{name: array}`` from a ``.npz``, ``.safetensors`` or ``.pth`` / ``.pt`` file (chosen by suffix)."""
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    loaders = {".npz": load_npz, ".safetensors": load_safetensors, ".pth": load_pth, ".pt": load_pth}
    if suffix not in loaders:
        raise ValueError(f"{path}: unknown weight file suffix {suffix!r}; expected one of {', '.join(loaders)}")
    return loaders[suffix](path)
