"""Workdir and data-dir paths as `etils.epath.Path`, so the same code writes a local directory
or a bucket (`gs://bucket/run`, `s3://...`).

epath serves URIs through fsspec (gcsfs for gs://) or, when TensorFlow is installed, tf.io.gfile;
local paths through the os module. Object stores have no rename and no create-if-absent through
epath: the few places that need atomicity (the workdir lock, rewriting metrics.jsonl) ask
`is_remote` and say what they guarantee there (docs/architecture.md, "Cloud workdirs").
"""

from __future__ import annotations

import importlib.util
import os

from etils import epath

PathLike = str | os.PathLike


def is_remote(path: PathLike) -> bool:
    """Whether `path` names an object store or other URI (`scheme://...`), not a local file."""
    return "://" in os.fspath(path)


def has_module(name: str) -> bool:
    """Whether `name` (a dotted module) is importable, without importing it."""
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a missing parent package (google.cloud)
        return False


def missing_gcs_clients() -> list[str]:
    """The pip packages a gs:// workdir needs that are not installed: gcsfs (epath's backend for
    gs://, unless TensorFlow's gfile serves it) and google-cloud-storage (orbax asks the bucket
    for its layout when a CheckpointManager opens a gs:// directory)."""
    missing = [] if has_module("gcsfs") or has_module("tensorflow") else ["gcsfs"]
    return missing + ([] if has_module("google.cloud.storage") else ["google-cloud-storage"])


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath.Path: a URI unchanged, a local path with `~` expanded and made absolute."""
    if isinstance(path, str) and not path.strip():
        raise ValueError("empty path: name a directory, e.g. --workdir=/tmp/run or gs://bucket/run")
    p = epath.Path(path)
    return p if is_remote(p) else p.expanduser().absolute()
