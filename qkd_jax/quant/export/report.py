"""Size report: bytes of an export against the float32 checkpoint, per layer and in total.

Per row:
  quantized layer  fp32 = 4 x (kernel + bias + its quantizer parameters)
                   export = packed codes + codebook + bias + 4 bytes per float scalar of the
                   manifest (weight scale, activation parameters, output scale)
  BatchNorm        fp32 = 4 x (scale + bias + mean + var)   (params and batch_stats)
                   export = mul + add
  other FP arrays  the same bytes on both sides (grouped by module)
The rows add up to the float32 size of the checkpoint's params + batch_stats; the report also
states params alone (the trained parameters, float32) and the file's size on disk (archive
headers and the JSON manifest included).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from etils import epath

from qkd_jax.quant.export.fileformat import IntegerExport

F32 = 4


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    kind: str
    precision: str
    fp32_bytes: int
    export_bytes: int

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.export_bytes if self.export_bytes else float("inf")


@dataclasses.dataclass(frozen=True)
class SizeReport:
    rows: tuple[Row, ...]
    params_fp32_bytes: int
    batch_stats_fp32_bytes: int
    file_bytes: Optional[int] = None

    @property
    def fp32_bytes(self) -> int:
        return sum(r.fp32_bytes for r in self.rows)

    @property
    def export_bytes(self) -> int:
        return sum(r.export_bytes for r in self.rows)

    def format(self) -> str:
        header = ("layer", "kind", "precision", "fp32 bytes", "export bytes", "ratio")
        lines = [header]
        for r in self.rows:
            lines.append((r.name, r.kind, r.precision, f"{r.fp32_bytes:,}", f"{r.export_bytes:,}", f"{r.ratio:.1f}x"))
        total = self.fp32_bytes
        lines.append(("total", "", "params + batch_stats", f"{total:,}", f"{self.export_bytes:,}",
                      f"{total / max(self.export_bytes, 1):.1f}x"))
        widths = [max(len(l[i]) for l in lines) for i in range(len(header))]
        right = {3, 4, 5}
        out = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(l, widths))).rstrip()
               for l in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        out.insert(len(out) - 1, out[1])
        out.append(f"float32 checkpoint params: {self.params_fp32_bytes:,} bytes "
                   f"(+ batch_stats {self.batch_stats_fp32_bytes:,}); export payload {self.export_bytes:,} bytes: "
                   f"{self.params_fp32_bytes / max(self.export_bytes, 1):.1f}x smaller than the params alone")
        if self.file_bytes is not None:
            out.append(f"export file on disk: {self.file_bytes:,} bytes (npz headers and JSON manifest included): "
                       f"{self.params_fp32_bytes / self.file_bytes:.1f}x smaller than the float32 params")
        return "\n".join(out)


def _bits(b: Optional[int]) -> str:
    return "fp" if b is None else str(b)


def _nbytes(exported: IntegerExport, ref: Optional[dict]) -> int:
    return 0 if ref is None else int(exported.arrays[ref["key"]].nbytes)


def size_report(exported: IntegerExport, file_path: Optional[str] = None) -> SizeReport:
    """The size report of an export (sizes of the FP side from the manifest's shapes)."""
    rows = []
    for path, e in exported.layers.items():
        w, a = e["weight"], e["activation"]
        n_kernel = int(np.prod(e["kernel_shape"]))
        n_bias = e["kernel_shape"][-1] if e["bias"] is not None else 0
        scalars = (len(w.get("quantizer_params", {})) + (len(a["params"]) if a else 0)
                   + (e["output_scale"] is not None))
        fp32 = F32 * (n_kernel + n_bias + scalars)
        if w["bits"] is None:
            exp = _nbytes(exported, w["kernel"])
        else:
            exp = _nbytes(exported, w["codes"]) + _nbytes(exported, w["levels"]) + F32  # + weight scale
        exp += _nbytes(exported, e["bias"]) + F32 * ((len(a["params"]) if a else 0) + (e["output_scale"] is not None))
        precision = f"{e['method']} W{_bits(e['w_bits'])}A{_bits(e['a_bits'])}"
        rows.append(Row(path, e["type"], precision, fp32, exp))
    fp_groups: dict[str, tuple[int, int]] = {}
    for name, ref in exported.manifest["fp"].items():
        module = name.split("/", 1)[1].rsplit("/", 1)[0] if name.count("/") >= 2 else name
        nb = _nbytes(exported, ref)
        size = exported.arrays[ref["key"]].size * F32  # the checkpoint side, as float32
        old = fp_groups.get(module, (0, 0))
        fp_groups[module] = (old[0] + size, old[1] + nb)
    bn = exported.manifest["batchnorm"]
    for path, e in bn.items():
        n = int(np.prod(e["mul"]["shape"]))
        vectors = 2 + bool(e.get("use_scale", True)) + bool(e.get("use_bias", True))  # mean, var, scale, bias
        rows.append(Row(path, "batchnorm", "affine fp32", F32 * vectors * n,
                        sum(_nbytes(exported, e[k]) for k in ("mean", "mul", "add"))))
    for module, (fp32, nb) in fp_groups.items():
        rows.append(Row(module, "fp", "float32", fp32, nb))
    ref = exported.manifest["reference"]
    file_bytes = epath.Path(file_path).stat().length if file_path is not None else None
    return SizeReport(tuple(rows), F32 * ref["params_count"], F32 * ref["batch_stats_count"], file_bytes)
