"""The export file: one .npz archive of arrays plus a JSON manifest, and the manifest's validator.

File layout (`save` / `load`; numpy's .npz, uncompressed, no pickles):

    __manifest__                 uint8: the UTF-8 JSON manifest (authoritative copy)
    layers/<path>/codes          uint8: weight codes, bit-packed ("bitstream_le") for 1-4 bits,
                                 one code per byte ("none") for 5-8 bits; C order of the kernel
    layers/<path>/levels         float32[L]: codebook, the exact float32 weight of each code
    layers/<path>/kernel         float32: the kernel, only when the layer's weights are FP
    layers/<path>/bias           float32[features]: the layer's bias, when it has one
    bn/<path>/mean, mul, add     float32: BatchNorm as y = (x - mean) * mul + add (per channel;
                                 flax's inference expression, mul = rsqrt(var + eps) * scale,
                                 add = bias; fold to x * mul + (add - mean * mul) if you like)
    fp/<collection>/<path>       float32 (any dtype): every other variable (FP stem / classifier
                                 kernels and biases, ...) under its flax path

A copy of the manifest is written next to the archive as <name>.json for reading; `load` uses
the embedded one. Manifest (format "qkd_jax.integer_export", version 3):

    format, version             identify the file
    checksums                   {array key: sha256 hex of its bytes in C order}, one per array;
                                written by `save`, verified by `load` (version 3; a version 2
                                file has none and loads with a warning)
    model.input_shape           (H, W, C) the export was traced with; model.apply_kwargs
    config                      the run config (JSON string) to rebuild the flax model, or null
    source                      where it came from (workdir, phase, step, kind), or null
    layers[path]                one per quantized conv/dense layer, in call order:
      type                      "conv" | "dense";  kernel_shape
      method, w_bits, a_bits, a_signed   the layer's precision (qkd_jax.quant.rules)
      weight                    {bits, codes: {key, packing, count, dtype}, levels: {key},
                                 grid: {levels, multiplier, zero_point, scale}, quantizer_params}
                                 or {bits: null, kernel: {key}} (FP weights)
      activation                {bits, signed, params: {a_lower, ...: float32 values},
                                 grid: {...}} or null (FP input)
      output_scale              the learnable output scale (float32 value; |.| is applied) or null
      bias                      {key} or null
      accumulator_bound         max |sum q_a q_w| over the receptive field (< 2^31: int32 is safe)
    batchnorm[path]             {axis, epsilon, use_scale, use_bias, mean: {key}, mul: {key}, add: {key}}
    fp[collection/path]         {key}
    reference                   {params_count, batch_stats_count}: the float checkpoint's sizes

Each `{key}` entry also records the array's `shape` and `dtype`; the validator checks them
against the archive. Grid semantics (codes.py): q = multiplier * code - zero_point, real value
= scale * q; `levels[code]` is that value exactly as the student's float32 forward pass had it.
Float scalars are float32 numbers written as JSON doubles (exact both ways). Every float array
must be finite. Whatever is wrong with a file (not an archive, truncated, a checksum that does
not match, a NaN level, a malformed manifest), `load` raises ManifestError naming the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import warnings
from typing import Any, Mapping, Optional

import numpy as np
from etils import epath

from qkd_jax.quant.export import codes as qcodes
from qkd_jax.quant.export.packing import PACKING, UNPACKED, packed_nbytes, unpack_codes
from qkd_jax.quant.rules import LayerPrecision

FORMAT = "qkd_jax.integer_export"
VERSION = 3  # 3: sha256 checksums of the arrays; 2: BatchNorm as (x - mean) * mul + add (1: x * mul + add)
READABLE_VERSIONS = (2, 3)  # 2 is version 3 without checksums
MANIFEST_KEY = "__manifest__"
INT32_MAX = 2**31 - 1


class ManifestError(ValueError):
    """The manifest (or the archive it describes) is malformed."""


def _fail(where: str, why: str) -> None:
    raise ManifestError(f"invalid export manifest at {where}: {why}")


def _get(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        _fail(where, f"expected an object, got {type(d).__name__}")
    if key not in d:
        _fail(f"{where}.{key}", "missing")
    return d[key]


def _int(v: Any, where: str, lo: int = -(2**62), hi: int = 2**62) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        _fail(where, f"expected an integer in [{lo}, {hi}], got {v!r}")
    return v


def _float(v: Any, where: str, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        _fail(where, f"expected a finite{' positive' if positive else ''} number, got {v!r}")
    return float(v)


def _bits(v: Any, where: str, optional: bool = True) -> Optional[int]:
    if v is None and optional:
        return None
    return _int(v, where, 1, 8)


def _shape(v: Any, where: str) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in v):
        _fail(where, f"expected a list of non-negative integers, got {v!r}")
    return tuple(v)


def _array_ref(ref: Any, where: str, arrays: Optional[Mapping[str, np.ndarray]], used: set,
               shape: Optional[tuple] = None, dtype: Optional[str] = None) -> dict:
    key = _get(ref, "key", where)
    if not isinstance(key, str) or not key or key == MANIFEST_KEY:
        _fail(f"{where}.key", f"expected an array name, got {key!r}")
    rec_shape = _shape(_get(ref, "shape", where), f"{where}.shape")
    rec_dtype = _get(ref, "dtype", where)
    if not isinstance(rec_dtype, str):
        _fail(f"{where}.dtype", f"expected a dtype name, got {rec_dtype!r}")
    if shape is not None and rec_shape != tuple(shape):
        _fail(f"{where}.shape", f"expected {list(shape)}, got {list(rec_shape)}")
    if dtype is not None and rec_dtype != dtype:
        _fail(f"{where}.dtype", f"expected {dtype!r}, got {rec_dtype!r}")
    if arrays is not None:
        if key not in arrays:
            _fail(f"{where}.key", f"array {key!r} is not in the archive")
        arr = arrays[key]
        if tuple(arr.shape) != rec_shape or str(arr.dtype) != rec_dtype:
            _fail(where, f"array {key!r} is {arr.dtype}{list(arr.shape)}, manifest says {rec_dtype}{list(rec_shape)}")
    used.add(key)
    return ref


def array_checksum(array: np.ndarray) -> str:
    """sha256 (hex) of the array's bytes in C order; shape and dtype are checked separately."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _check_checksums(checksums: Any, arrays: Optional[Mapping[str, np.ndarray]], used: set) -> None:
    """One sha256 per described array; with `arrays`, each one must match its array's bytes."""
    if not isinstance(checksums, Mapping):
        _fail("checksums", f"expected an object, got {type(checksums).__name__}")
    if set(checksums) != used:
        missing, extra = sorted(used - set(checksums)), sorted(set(checksums) - used)
        _fail("checksums", f"must list exactly the described arrays (missing {missing[:5]}, extra {extra[:5]})")
    for key, digest in checksums.items():
        if not isinstance(digest, str) or len(digest) != 64:
            _fail(f"checksums[{key!r}]", f"expected a sha256 hex digest, got {digest!r}")
        if arrays is not None and array_checksum(arrays[key]) != digest:
            _fail(f"checksums[{key!r}]", f"array {key!r} does not match its checksum: the file is damaged "
                                         f"or was edited after export")


def _check_finite_arrays(arrays: Mapping[str, np.ndarray]) -> None:
    for key, arr in arrays.items():
        if key != MANIFEST_KEY and arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            _fail(f"array {key!r}", f"{bad} non-finite value(s) (NaN or inf); an export holds finite numbers only")


def layer_precision(entry: Mapping[str, Any]) -> LayerPrecision:
    """The LayerPrecision a manifest layer entry describes."""
    return LayerPrecision(method=entry["method"], w_bits=entry["w_bits"], a_bits=entry["a_bits"],
                          a_signed=bool(entry["a_signed"]), output_scale=entry["output_scale"] is not None)


def _check_grid(grid: Any, expected: qcodes.Grid, where: str) -> None:
    for name in ("levels", "multiplier", "zero_point"):
        got = _int(_get(grid, name, where), f"{where}.{name}", 0, 2**16)
        if got != getattr(expected, name):
            _fail(f"{where}.{name}", f"the {name} of this method and bit width is {getattr(expected, name)}, got {got}")
    _float(_get(grid, "scale", where), f"{where}.scale", positive=True)


def _check_layer(path: str, e: Any, arrays, used: set) -> None:
    where = f"layers[{path!r}]"
    kind = _get(e, "type", where)
    if kind not in ("conv", "dense"):
        _fail(f"{where}.type", f"expected 'conv' or 'dense', got {kind!r}")
    method = _get(e, "method", where)
    if method not in qcodes.METHODS:
        _fail(f"{where}.method", f"expected one of {qcodes.METHODS}, got {method!r}")
    w_bits = _bits(_get(e, "w_bits", where), f"{where}.w_bits")
    a_bits = _bits(_get(e, "a_bits", where), f"{where}.a_bits")
    if w_bits is None and a_bits is None:
        _fail(where, "neither weights nor activations are quantized (such a layer belongs in 'fp')")
    if not isinstance(_get(e, "a_signed", where), bool):
        _fail(f"{where}.a_signed", "expected true or false")
    kshape = _shape(_get(e, "kernel_shape", where), f"{where}.kernel_shape")
    if (kind == "dense" and len(kshape) != 2) or (kind == "conv" and len(kshape) < 3) or 0 in kshape:
        _fail(f"{where}.kernel_shape", f"{kshape} is not a {kind} kernel shape")
    os_ = _get(e, "output_scale", where)
    if os_ is not None:
        _float(os_, f"{where}.output_scale")
    lp = layer_precision(e)
    count = int(np.prod(kshape))
    w = _get(e, "weight", where)
    wb = _bits(_get(w, "bits", f"{where}.weight"), f"{where}.weight.bits")
    if wb != w_bits:
        _fail(f"{where}.weight.bits", f"{wb!r} differs from w_bits={w_bits!r}")
    max_q_w = None
    if w_bits is None:
        _array_ref(_get(w, "kernel", f"{where}.weight"), f"{where}.weight.kernel", arrays, used, kshape)
    else:
        c = _get(w, "codes", f"{where}.weight")
        cw = f"{where}.weight.codes"
        packing = _get(c, "packing", cw)
        if packing not in (PACKING, UNPACKED):
            _fail(f"{cw}.packing", f"expected {PACKING!r} or {UNPACKED!r}, got {packing!r}")
        if _int(_get(c, "count", cw), f"{cw}.count", 0) != count:
            _fail(f"{cw}.count", f"expected {count} (the kernel's size), got {c['count']}")
        nbytes = packed_nbytes(count, w_bits) if packing == PACKING else count
        _array_ref(c, cw, arrays, used, (nbytes,), "uint8")
        grid = _get(w, "grid", f"{where}.weight")
        dummy = {k: 1.0 for k in qcodes.WEIGHT_PARAMS[method]}
        expected = qcodes.weight_grid(lp, dummy, np.ones(1, np.float32))
        _check_grid(grid, expected, f"{where}.weight.grid")
        if expected.levels > 2**w_bits:
            _fail(f"{where}.weight.grid", "more levels than the bit width can hold")
        _array_ref(_get(w, "levels", f"{where}.weight"), f"{where}.weight.levels", arrays, used,
                   (expected.levels,), "float32")
        max_q_w = expected.max_abs_q
        if arrays is not None:
            packed = arrays[c["key"]]
            if packing == PACKING:
                try:
                    codes = unpack_codes(packed, w_bits, count)
                except ValueError as err:
                    _fail(cw, str(err))
            else:
                codes = packed
            if codes.size and int(codes.max()) >= expected.levels:
                _fail(cw, f"code {int(codes.max())} is outside the grid's {expected.levels} levels")
    a = _get(e, "activation", where)
    max_q_a = None
    if a_bits is None:
        if a is not None:
            _fail(f"{where}.activation", "must be null when a_bits is null")
    else:
        aw = f"{where}.activation"
        if _bits(_get(a, "bits", aw), f"{aw}.bits") != a_bits:
            _fail(f"{aw}.bits", f"differs from a_bits={a_bits}")
        if _get(a, "signed", aw) != e["a_signed"]:
            _fail(f"{aw}.signed", "differs from the layer's a_signed")
        params = _get(a, "params", aw)
        names = qcodes.ACTIVATION_PARAMS[method]
        if not isinstance(params, Mapping) or sorted(params) != sorted(names):
            _fail(f"{aw}.params", f"method {method!r} needs exactly {list(names)}, got {params!r}")
        for k in names:
            _float(params[k], f"{aw}.params.{k}", positive=k != "a_lower" and k != "a_upper")
        if {"a_lower", "a_upper"} <= set(names) and not params["a_upper"] > params["a_lower"]:
            _fail(f"{aw}.params", "a_upper must exceed a_lower")
        expected = qcodes.activation_grid(lp, {k: 1.0 for k in names})
        _check_grid(_get(a, "grid", aw), expected, f"{aw}.grid")
        max_q_a = expected.max_abs_q
    bias = _get(e, "bias", where)
    if bias is not None:
        _array_ref(bias, f"{where}.bias", arrays, used, (kshape[-1],))
    bound = _int(_get(e, "accumulator_bound", where), f"{where}.accumulator_bound", 0)
    if max_q_w is not None and max_q_a is not None:
        need = int(np.prod(kshape[:-1])) * max_q_w * max_q_a
        if bound != need:
            _fail(f"{where}.accumulator_bound", f"expected {need}, got {bound}")
        if bound > INT32_MAX:
            _fail(f"{where}.accumulator_bound", f"{bound} overflows int32 accumulation")


def validate_manifest(manifest: Any, arrays: Optional[Mapping[str, np.ndarray]] = None, *,
                      require_checksums: bool = False) -> None:
    """Checks the manifest's structure, types and internal consistency; with `arrays`, also that
    every referenced array exists with the recorded shape/dtype, packed codes decode, every float
    array is finite, no array is left undescribed and (when the manifest has them, always with
    `require_checksums`) every array matches its checksum. Raises ManifestError naming the field."""
    if not isinstance(manifest, Mapping):
        _fail("<root>", f"expected a JSON object, got {type(manifest).__name__}")
    if _get(manifest, "format", "<root>") != FORMAT:
        _fail("format", f"expected {FORMAT!r}, got {manifest['format']!r}")
    version = _int(_get(manifest, "version", "<root>"), "version", 1)
    if version not in READABLE_VERSIONS:
        _fail("version", f"this reader understands versions {READABLE_VERSIONS}, got {version}; "
                         f"export the checkpoint again with this version of qkd_jax")
    model = _get(manifest, "model", "<root>")
    _shape(_get(model, "input_shape", "model"), "model.input_shape")
    if not isinstance(_get(model, "apply_kwargs", "model"), Mapping):
        _fail("model.apply_kwargs", "expected an object")
    config = _get(manifest, "config", "<root>")
    if config is not None and not isinstance(config, str):
        _fail("config", "expected a JSON string or null")
    used: set = set()
    layers = _get(manifest, "layers", "<root>")
    if not isinstance(layers, Mapping) or not layers:
        _fail("layers", "expected a non-empty object (an export has at least one quantized layer)")
    for path, entry in layers.items():
        _check_layer(path, entry, arrays, used)
    bns = _get(manifest, "batchnorm", "<root>")
    if not isinstance(bns, Mapping):
        _fail("batchnorm", "expected an object")
    for path, e in bns.items():
        where = f"batchnorm[{path!r}]"
        axis = _get(e, "axis", where)
        if not isinstance(axis, list) or not axis or not all(type(a) is int for a in axis):
            _fail(f"{where}.axis", f"expected a non-empty list of integers, got {axis!r}")
        _float(_get(e, "epsilon", where), f"{where}.epsilon")
        for flag in ("use_scale", "use_bias"):
            if not isinstance(_get(e, flag, where), bool):
                _fail(f"{where}.{flag}", "expected true or false")
        mul = _array_ref(_get(e, "mul", where), f"{where}.mul", arrays, used)
        for name in ("mean", "add"):
            _array_ref(_get(e, name, where), f"{where}.{name}", arrays, used, tuple(mul["shape"]), mul["dtype"])
    fp = _get(manifest, "fp", "<root>")
    if not isinstance(fp, Mapping):
        _fail("fp", "expected an object")
    for path, ref in fp.items():
        _array_ref(ref, f"fp[{path!r}]", arrays, used)
    ref = _get(manifest, "reference", "<root>")
    _int(_get(ref, "params_count", "reference"), "reference.params_count", 0)
    _int(_get(ref, "batch_stats_count", "reference"), "reference.batch_stats_count", 0)
    if arrays is not None:
        extra = sorted(set(arrays) - used - {MANIFEST_KEY})
        if extra:
            _fail("<root>", f"archive arrays not described by the manifest: {extra[:5]}")
        _check_finite_arrays(arrays)
    if "checksums" in manifest or require_checksums:
        if version < 3:
            _fail("checksums", f"version {version} has no checksums")
        _check_checksums(_get(manifest, "checksums", "<root>"), arrays, used)


@dataclasses.dataclass
class IntegerExport:
    """An exported model: the manifest and its arrays (numpy)."""

    manifest: dict
    arrays: dict

    def validate(self) -> "IntegerExport":
        validate_manifest(self.manifest, self.arrays)
        return self

    @property
    def layers(self) -> dict:
        return self.manifest["layers"]

    def weight_codes(self, path: str) -> np.ndarray:
        """The uint8 weight codes of a quantized layer, in the kernel's shape."""
        w = self.layers[path]["weight"]
        c = w["codes"]
        packed = self.arrays[c["key"]]
        flat = unpack_codes(packed, w["bits"], c["count"]) if c["packing"] == PACKING else packed
        return flat.reshape(self.layers[path]["kernel_shape"])

    def weight_grid(self, path: str) -> qcodes.Grid:
        g = self.layers[path]["weight"]["grid"]
        return qcodes.Grid(g["levels"], g["multiplier"], g["zero_point"], g["scale"])

    def activation_grid(self, path: str) -> qcodes.Grid:
        g = self.layers[path]["activation"]["grid"]
        return qcodes.Grid(g["levels"], g["multiplier"], g["zero_point"], g["scale"])

    def q_weights(self, path: str) -> np.ndarray:
        """Signed integer weights q = multiplier * code - zero_point (int32, the kernel's shape)."""
        return self.weight_grid(path).q(self.weight_codes(path))

    def dequantize(self, path: str) -> np.ndarray:
        """float32 weights of a layer: levels[code] (quantized) or the stored FP kernel."""
        w = self.layers[path]["weight"]
        if w["bits"] is None:
            return self.arrays[w["kernel"]["key"]]
        return self.arrays[w["levels"]["key"]][self.weight_codes(path)]

    def manifest_json(self) -> str:
        return json.dumps(self.manifest, indent=1, sort_keys=False)

    def with_checksums(self) -> "IntegerExport":
        """The same export at the current VERSION with the sha256 of every array in its manifest."""
        keys = sorted(k for k in self.arrays if k != MANIFEST_KEY)
        manifest = {**self.manifest, "version": VERSION,
                    "checksums": {k: array_checksum(self.arrays[k]) for k in keys}}
        return IntegerExport(manifest, self.arrays)

    def save(self, path: str | os.PathLike, *, sidecar: bool = True) -> epath.Path:
        """Writes the .npz archive (and <name>.json with the manifest), the manifest carrying
        the checksum of every array (`with_checksums`). Returns the archive path.

        `path` may be local (written to a temporary file, then renamed: atomic) or a bucket URI
        such as gs://bucket/w2a2.npz (one object write, which is atomic on GCS)."""
        self.validate()
        stored = self.with_checksums().validate()
        path = epath.Path(path)
        compact = json.dumps(stored.manifest, separators=(",", ":"))
        payload = {**self.arrays, MANIFEST_KEY: np.frombuffer(compact.encode("utf-8"), np.uint8)}
        buffer = io.BytesIO()
        np.savez(buffer, **payload)
        path.parent.mkdir(parents=True, exist_ok=True)
        if "://" in os.fspath(path):  # an object store: no rename, but each object write is atomic
            path.write_bytes(buffer.getvalue())
        else:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_bytes(buffer.getvalue())
            tmp.replace(path)
        if sidecar:
            path.with_suffix(".json").write_text(stored.manifest_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "IntegerExport":
        """Reads and validates an archive written by `save`; any problem is a ManifestError
        that names the file (FileNotFoundError when there is no file)."""
        path = epath.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no export file {path}")
        arrays = _read_archive(path)
        if MANIFEST_KEY not in arrays:
            raise ManifestError(f"{path} has no {MANIFEST_KEY!r} entry: not a qkd_jax export")
        raw = arrays.pop(MANIFEST_KEY)
        try:
            manifest = json.loads(raw.tobytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ManifestError(f"{path}: the manifest is not valid JSON: {err}") from None
        version = manifest.get("version") if isinstance(manifest, dict) else None
        try:
            validate_manifest(manifest, arrays, require_checksums=version != 2)
        except ManifestError as err:
            raise ManifestError(f"{path}: {err}") from None
        if version == 2:
            warnings.warn(f"{path} is a version 2 export without checksums: damage to its arrays "
                          f"cannot be detected; export it again to get a version {VERSION} file", stacklevel=2)
        return cls(manifest, arrays)


def _read_archive(path: epath.Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at `path`; a file numpy cannot read as one (empty, truncated,
    random bytes, a pickle, a damaged member) becomes a ManifestError naming it."""
    try:
        with path.open("rb") as f:
            loaded = np.load(io.BytesIO(f.read()), allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise TypeError("it holds a single array, not an .npz archive")
            with loaded as z:
                return {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001  (zipfile, zlib, numpy format and pickle checks raise many types)
        raise ManifestError(f"{path} is not a readable export archive ({type(err).__name__}: {err}); "
                            f"export the checkpoint again") from None
