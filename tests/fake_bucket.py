"""An in-memory stand-in for Google Cloud Storage behind `etils.epath`, for the cloud-workdir tests.

etils.epath serves `gs://` paths through fsspec's "gcs" filesystem (gcsfs) when TensorFlow is not
installed. The `fake_gcs` fixture registers, for the "gs" and "gcs" protocols, fsspec's memory
filesystem with the two properties of an object store that the code must respect: no append
(`open(..., 'a')` raises, as an object cannot be extended in place) and no partial objects (an
object appears when its writer closes). Everything the runner does with a `gs://` workdir then
happens in this process's memory, through the same epath calls it makes on a real bucket.

Orbax is not covered: it writes array data through TensorStore's own GCS driver, not fsspec.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import fsspec
import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem


class FakeGCS(MemoryFileSystem):
    """fsspec's memory filesystem under the gs:// and gcs:// protocols, without append."""

    protocol = ("gs", "gcs")
    root_marker = ""
    store: ClassVar[dict] = {}  # shared by every instance, as MemoryFileSystem's own
    pseudo_dirs: ClassVar[list] = [""]

    @classmethod
    def _strip_protocol(cls, path):
        path = fsspec.utils.stringify_path(path)
        for prefix in ("gs://", "gcs://"):
            path = path.removeprefix(prefix)
        return path.rstrip("/")

    def _open(self, path, mode="rb", **kwargs):
        if "a" in mode:
            raise NotImplementedError(f"{path}: an object store object cannot be appended to")
        return super()._open(path, mode=mode, **kwargs)


def bucket_files() -> dict[str, bytes]:
    """Every object in the fake bucket: {'bucket/key': contents}."""
    return {k: bytes(v.getbuffer()) for k, v in FakeGCS.store.items()}


@pytest.fixture
def fake_gcs(monkeypatch):
    """gs:// paths served from memory for the test (emptied before and after)."""
    monkeypatch.setenv("EPATH_USE_TF", "false")  # epath's fsspec backend, as without TensorFlow
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, FakeGCS, clobber=True)
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    FakeGCS.clear_instance_cache()
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    yield FakeGCS
    FakeGCS.store.clear()
    FakeGCS.pseudo_dirs[:] = [""]
    epath_backend.fsspec_backend._get_filesystem.cache_clear()
    # gcsfs, when installed, is found again by the next fsspec.filesystem('gcs') lookup.
    registry = importlib.import_module("fsspec.registry")._registry
    for protocol in ("gs", "gcs"):
        registry.pop(protocol, None)
