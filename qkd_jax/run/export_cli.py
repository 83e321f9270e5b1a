"""Command line: integer export of a trained student phase, with its size report.

    python -m qkd_jax.export --workdir=/tmp/qkd_digits --phase=sqakd --out=/tmp/sqakd_w2a2.npz
    python -m qkd_jax.export --workdir=/tmp/qkd_digits --phase=sqakd --format=onnx --out=student.onnx
    python -m qkd_jax.export --workdir=/tmp/qkd_digits --phase=sqakd --format=stablehlo --out=student.stablehlo

Reads the newest completed checkpoint of WORKDIR/PHASE (or --step), rebuilds the student from
the config stored with it (or --config, a config file as for qkd_jax.main, or a config.json of a
run), writes OUT (.npz arrays + embedded JSON manifest) and OUT with suffix .json (the manifest,
for reading), and prints the per-layer size report. --format=onnx writes an ONNX model
(--onnx-types=container: integer ConvInteger / MatMulInteger kernels in onnxruntime; strict:
INT4/UINT4/INT2/UINT2 Q/DQ, run as float by onnxruntime) and checks it in onnxruntime against the
integer inference; --format=stablehlo writes a jax.export artifact (cpu, cuda, tpu). Both are
built from the same export record as the .npz and written atomically (temporary name, rename).
Errors (missing phase, an FP checkpoint such
as the teacher, a config that does not describe the checkpoint or differs from the settings it
recorded: model, classes, image size, method, bits, preset, pact_alpha; an unreadable checkpoint;
an OUT that cannot be written; a gs:// path without gcsfs and google-cloud-storage installed;
a layer the chosen format cannot represent; --format=onnx without the onnx package)
print one message and exit 2.
Format and exactness: qkd_jax/quant/export/ (fileformat.py, codes.py, integer_inference.py).
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qkd_jax.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the run's working directory")
    parser.add_argument("--phase", required=True, help="the student phase to export (e.g. sqakd, qat, calibrate)")
    parser.add_argument("--out", required=True,
                        help="output file: .npz (the manifest also goes to OUT.json), .onnx or .stablehlo")
    parser.add_argument("--format", default="npz", choices=FORMATS, help="npz (default), onnx or stablehlo")
    parser.add_argument("--onnx-types", default="container", choices=("container", "strict"),
                        help="container: int8/uint8 codes, integer kernels (default); strict: INT4/INT2 types")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest completed)")
    parser.add_argument("--config", default=None, help="config file overriding the checkpoint's stored config")
    return parser.parse_args(argv)


#: --format -> the suffix OUT must have.
FORMATS = {"npz": ".npz", "onnx": ".onnx", "stablehlo": ".stablehlo"}

#: Images of the onnxruntime check the CLI prints (random normal inputs: the export holds no data).
CHECK_IMAGES = 32


def _out_problem(out, fmt: str = "npz") -> Optional[str]:
    """Why OUT cannot be written, found before the export's work (None when it can be tried)."""
    if out.suffix != FORMATS[fmt]:
        return f"--out must name a {FORMATS[fmt]} file for --format={fmt}, got {out}"
    if "://" in str(out):
        if fmt != "npz":
            return f"--format={fmt} writes a local file; got {out} (copy it to the bucket afterwards)"
        return None
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"--out={out}: {parent} is a file, not a directory; choose another --out"
    if out.is_dir():
        return f"--out={out} is a directory; name a .npz file"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes on checkpoint metadata
    from qkd_jax.quant.export import ExportError, ManifestError, size_report
    from qkd_jax.run.config_files import load_config
    from qkd_jax.run.export_checkpoint import export_checkpoint
    from qkd_jax.run.preflight import WorkdirNotWritableError, check_bucket_clients
    from qkd_jax.train.checkpoint import CorruptCheckpointError
    from qkd_jax.train.paths import as_path

    out = as_path(args.out)  # local or a bucket URI (gs://bucket/w2a2.npz)
    problem = _out_problem(out, args.format)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.format == "onnx":
            from qkd_jax.quant.export.onnx_format import require_onnx

            require_onnx()  # before the checkpoint's work
        check_bucket_clients([as_path(args.workdir), out])  # gs:// needs gcsfs and google-cloud-storage
        config = load_config(args.config) if args.config else None
        exported = export_checkpoint(args.workdir, args.phase, step=args.step, config=config)
    except (ExportError, ManifestError, FileNotFoundError, CorruptCheckpointError, WorkdirNotWritableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.format != "npz":
        return _write_other_format(exported, out, args)
    try:
        path = exported.save(out)
    except (ExportError, ManifestError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write --out={out} ({type(err).__name__}: {err.strerror or err}); choose "
              f"another --out", file=sys.stderr)
        return 2
    src = exported.manifest["source"]
    print(f"exported {src['phase']} step {src['step']} of {src['workdir']} -> {path} "
          f"(manifest: {path.with_suffix('.json')})")
    print(size_report(exported, str(path)).format())
    return 0


def _write_other_format(exported, out, args) -> int:
    """--format=onnx / stablehlo: write OUT from the export record and print what was written."""
    import numpy as np

    from qkd_jax.quant.export import ExportError, IntegerModel
    from qkd_jax.run.export_checkpoint import load_model

    src = exported.manifest["source"]
    try:
        model = load_model(exported)
        if args.format == "stablehlo":
            from qkd_jax.quant.export.stablehlo_format import PLATFORMS, save_stablehlo, to_stablehlo

            path = save_stablehlo(to_stablehlo(model, exported), out)
            print(f"exported {src['phase']} step {src['step']} of {src['workdir']} -> {path} "
                  f"(jax.export, platforms {', '.join(PLATFORMS)}, batch dimension symbolic)")
            return 0
        from qkd_jax.quant.export.onnx_format import save_onnx, to_onnx

        proto = to_onnx(model, exported, types=args.onnx_types)
        path = save_onnx(proto, out)
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write --out={out} ({type(err).__name__}: {err.strerror or err}); choose "
              f"another --out", file=sys.stderr)
        return 2
    props = {p.key: p.value for p in proto.metadata_props}
    print(f"exported {src['phase']} step {src['step']} of {src['workdir']} -> {path} (ONNX, "
          f"{args.onnx_types} types, {props['integer_layers']} integer layers, {props['qdq_layers']} Q/DQ "
          f"layers, {props['float_layers']} float layers)")
    try:
        from qkd_jax.quant.export.onnx_check import check_onnx, require_onnxruntime

        require_onnxruntime()
    except ExportError as err:
        print(f"not checked in onnxruntime: {err}")
        return 0
    shape = (CHECK_IMAGES, *exported.manifest["model"]["input_shape"])
    images = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    reference = np.asarray(IntegerModel(model, exported)(images))
    print(check_onnx(proto.SerializeToString(), images, reference).format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
