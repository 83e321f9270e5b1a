"""Atomic local file writes for the export formats: a temporary name in the same directory, then
a rename, so a reader (or a crash) never sees a half-written model."""

from __future__ import annotations

import os


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> str:
    """Writes `data` to `path` via `path.tmp<pid>` and os.replace; the temporary file is removed on
    failure. Returns the path."""
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
