"""Command line: integer export of a trained student phase, with its size report.

    python -m qkd_jax.export --workdir=/tmp/qkd_digits --phase=sqakd --out=/tmp/sqakd_w2a2.npz

Reads the newest completed checkpoint of WORKDIR/PHASE (or --step), rebuilds the student from
the config stored with it (or --config, a config file as for qkd_jax.main, or a config.json of a
run), writes OUT (.npz arrays + embedded JSON manifest) and OUT with suffix .json (the manifest,
for reading), and prints the per-layer size report. Errors (missing phase, an FP checkpoint such
as the teacher, a config that does not describe the checkpoint or differs from the settings it
recorded: model, classes, image size, method, bits, preset, pact_alpha; an unreadable checkpoint;
an OUT that cannot be written; a gs:// path without gcsfs and google-cloud-storage installed)
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
    parser.add_argument("--out", required=True, help="output .npz file (the manifest also goes to OUT.json)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest completed)")
    parser.add_argument("--config", default=None, help="config file overriding the checkpoint's stored config")
    return parser.parse_args(argv)


def _out_problem(out) -> Optional[str]:
    """Why OUT cannot be written, found before the export's work (None when it can be tried)."""
    if out.suffix != ".npz":
        return f"--out must name a .npz file, got {out}"
    if "://" in str(out):
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
    problem = _out_problem(out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        check_bucket_clients([as_path(args.workdir), out])  # gs:// needs gcsfs and google-cloud-storage
        config = load_config(args.config) if args.config else None
        exported = export_checkpoint(args.workdir, args.phase, step=args.step, config=config)
    except (ExportError, ManifestError, FileNotFoundError, CorruptCheckpointError, WorkdirNotWritableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
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


if __name__ == "__main__":
    sys.exit(main())
