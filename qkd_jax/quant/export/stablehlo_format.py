"""StableHLO writer: the exported student's integer inference as a serialized `jax.export` artifact.

    data = to_stablehlo(load_model(exported), exported)         # bytes
    save_stablehlo(data, 'student.stablehlo')

    # anywhere with jax installed (no qkd_jax):
    from jax import export
    logits = export.deserialize(open('student.stablehlo', 'rb').read()).call(images)

The function is the reference integer inference of the export record (integer_inference.IntegerModel:
int32 convolutions on the codes, the export's scales, BatchNorm affines and FP arrays) with every
array closed over as a constant, so the artifact carries its weights. Input (batch, H, W, C)
float32 with a symbolic batch dimension; output the logits. Lowered for several platforms in one
artifact (default cpu, cuda, tpu: lowering needs no device of that kind); the caller's platform
must be one of them.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp

from qkd_jax.quant.export.atomic import write_bytes_atomic
from qkd_jax.quant.export.fileformat import IntegerExport
from qkd_jax.quant.export.integer_inference import IntegerModel

PLATFORMS = ("cpu", "cuda", "tpu")


def to_stablehlo(model, exported: IntegerExport, *, platforms: Sequence[str] = PLATFORMS) -> bytes:
    """Serialized jax.export.Exported of the export's integer inference (see the module docstring)."""
    integer_model = IntegerModel(model, exported)
    runtime = integer_model.runtime

    def inference(images):
        return integer_model._forward(runtime, images)

    batch = jax.export.symbolic_shape("batch")[0]
    shape = (batch, *(int(d) for d in exported.manifest["model"]["input_shape"]))
    artifact = jax.export.export(jax.jit(inference), platforms=tuple(platforms))(
        jax.ShapeDtypeStruct(shape, jnp.float32))
    return bytes(artifact.serialize())


def save_stablehlo(data: bytes, path: str | os.PathLike) -> str:
    """Writes the artifact through a temporary name and a rename (never half-written)."""
    return write_bytes_atomic(path, data)
