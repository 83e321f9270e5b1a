"""Integer export of a trained student and a reference integer inference that checks it.

    from qkd_jax.quant import export as qexport
    exported = qexport.export_variables(model, variables, input_shape)
    exported.save('student.npz')                                 # .npz arrays + JSON manifest
    exported = qexport.IntegerExport.load('student.npz')         # validated on load
    logits = qexport.IntegerModel(model, exported)(images)

From a run directory (the application layer): `qkd_jax.run.export_checkpoint.export_checkpoint(
workdir, 'sqakd')` and `load_model(exported)` rebuild the student from the stored config.
    print(qexport.size_report(exported).format())

Modules: codes (per-method grids, weight/activation codes), packing (bit packing),
fileformat (file, manifest, validator), exporter (model + variables -> export),
integer_inference (the student's flax graph with integer conv/dense), report (sizes).
Formats beside the .npz, each reading the same IntegerExport (imported on use: the ONNX one needs
the optional `onnx` extra): onnx_format (to_onnx / save_onnx; graph from graph_trace + onnx_graph,
checked with onnx_check), stablehlo_format (to_stablehlo / save_stablehlo, jax.export); atomic
(temporary name, then rename).
Command line: python -m qkd_jax.export --workdir=DIR --phase=NAME [--format=npz|onnx|stablehlo] --out=FILE
"""

from qkd_jax.quant.export.codes import Grid, activation_grid, encode_weight, weight_grid
from qkd_jax.quant.export.exporter import (
    ConfigMismatchError,
    ExportError,
    FullPrecisionModelError,
    export_variables,
)
from qkd_jax.quant.export.fileformat import FORMAT, VERSION, IntegerExport, ManifestError, validate_manifest
from qkd_jax.quant.export.integer_inference import IntegerModel, integer_apply
from qkd_jax.quant.export.packing import pack_codes, packed_nbytes, unpack_codes
from qkd_jax.quant.export.report import SizeReport, size_report

__all__ = [
    "FORMAT",
    "VERSION",
    "ConfigMismatchError",
    "ExportError",
    "FullPrecisionModelError",
    "Grid",
    "IntegerExport",
    "IntegerModel",
    "ManifestError",
    "SizeReport",
    "activation_grid",
    "encode_weight",
    "export_variables",
    "integer_apply",
    "pack_codes",
    "packed_nbytes",
    "size_report",
    "unpack_codes",
    "validate_manifest",
    "weight_grid",
]
