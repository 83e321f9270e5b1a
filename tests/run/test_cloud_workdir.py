"""Workdirs in a bucket: the runner's files (lock, metrics, config, summary, fresh deletion,
preflight probes, export files) on a `gs://` path served from memory (tests/fake_bucket.py),
through the same etils.epath calls a real bucket gets. Orbax writes gs:// arrays through
TensorStore's own GCS driver, which no in-memory filesystem reaches: the end-to-end test keeps
the phase checkpoints in a local directory (see `local_checkpoints`) and checks everything else
in the bucket.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest

from qkd_jax.data.info import resolve_data_dir
from qkd_jax.run import lock as lock_mod
from qkd_jax.run.fresh import NotAWorkdirError, remove_workdir
from qkd_jax.run.lock import WorkdirLock, WorkdirLockedError
from qkd_jax.run.preflight import (
    WorkdirNotWritableError,
    check_disk_space,
    check_writable,
)
from qkd_jax.train.metrics import MetricsWriter
from qkd_jax.train.paths import as_path, is_remote
from tests.fake_bucket import bucket_files, fake_gcs  # noqa: F401  (fixture)

RUN = "gs://bucket/runs/r1"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_paths_keep_uris_and_make_local_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(as_path(RUN)) == RUN and is_remote(as_path(RUN))
    assert str(as_path(RUN) / "teacher") == RUN + "/teacher"
    assert str(as_path("w/x")) == str(tmp_path / "w" / "x") and not is_remote(as_path("w/x"))
    with pytest.raises(ValueError, match="empty path"):
        as_path(" ")
    assert resolve_data_dir("gs://bucket/tensorflow_datasets") == "gs://bucket/tensorflow_datasets"
    assert resolve_data_dir("data") == str(tmp_path / "data")


def test_lock_in_a_bucket(fake_gcs, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lock_mod, "SETTLE_S", 0.0)
    lock = WorkdirLock(RUN)
    lock.acquire()
    assert json.loads(bucket_files()["bucket/runs/r1/.lock"]) == lock.record
    with pytest.raises(WorkdirLockedError, match=f"in use by PID {os.getpid()}"):
        WorkdirLock(RUN).acquire()
    lock.release()
    assert "bucket/runs/r1/.lock" not in bucket_files()


def test_lock_in_a_bucket_stale_and_foreign_holders(fake_gcs, monkeypatch):  # noqa: F811
    monkeypatch.setattr(lock_mod, "SETTLE_S", 0.0)
    path = as_path(RUN) / ".lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0.0}))
    with WorkdirLock(RUN) as lock:  # a dead PID on this host: taken over
        assert json.loads(path.read_text()) == lock.record
    assert not path.exists()
    foreign = {"host": "another-host-" + socket.gethostname(), "pid": 1, "time": 0.0}
    path.write_text(json.dumps(foreign))
    with pytest.raises(WorkdirLockedError, match="another-host-"):
        WorkdirLock(RUN).acquire()
    assert json.loads(path.read_text()) == foreign  # left alone


def test_lock_in_a_bucket_lost_race(fake_gcs, monkeypatch):  # noqa: F811
    """Another run writes its record while this one waits to read its own back: this one stops."""
    other = {"host": socket.gethostname(), "pid": os.getpid() + 1, "time": 1.0}

    def other_run_writes(_seconds):
        (as_path(RUN) / ".lock").write_text(json.dumps(other))

    monkeypatch.setattr(lock_mod.time, "sleep", other_run_writes)
    monkeypatch.setattr(lock_mod, "_pid_alive", lambda pid: True)
    with pytest.raises(WorkdirLockedError, match=f"PID {other['pid']}"):
        WorkdirLock(RUN).acquire()
    assert json.loads((as_path(RUN) / ".lock").read_text()) == other


def test_metrics_writer_rewrites_the_object(fake_gcs, capsys):  # noqa: F811
    writer = MetricsWriter(RUN, tensorboard=True)
    for step in (1, 2, 3):
        writer.write("teacher", step, "train", {"loss": float(step)})
    assert writer.drop_after("teacher", 1) == 2
    writer.write("teacher", 2, "train", {"loss": 20.0})
    writer.close()
    lines = bucket_files()["bucket/runs/r1/metrics.jsonl"].decode().splitlines()
    assert [(r["step"], r["loss"]) for r in map(json.loads, lines)] == [(1, 1.0), (2, 20.0)]
    # A resumed run reads the object back and goes on after its lines.
    again = MetricsWriter(RUN, tensorboard=False)
    again.write("student", 7, "eval", {"top1": 50.0})
    again.close()
    lines = bucket_files()["bucket/runs/r1/metrics.jsonl"].decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 7]
    if _find("google.cloud.storage") is None:  # tensorboardX's gs:// writer needs it
        assert "no TensorBoard events in gs://bucket/runs/r1/tb (install google-cloud-storage" in capsys.readouterr().out
        assert not any(k.startswith("bucket/runs/r1/tb") for k in bucket_files())


def _find(name: str):
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def test_remove_workdir_in_a_bucket(fake_gcs):  # noqa: F811
    root = as_path(RUN)
    (root / "config.json").write_text(json.dumps({"phase_order": "teacher"}))
    (root / "teacher" / "3").mkdir(parents=True)
    (root / "teacher" / "3" / "x").write_text("data")
    (root / "foreign.txt").write_text("keep me")
    with pytest.raises(NotAWorkdirError, match="foreign.txt"):
        remove_workdir(RUN)
    assert len(bucket_files()) == 3
    (root / "foreign.txt").unlink()
    assert remove_workdir(RUN)
    assert bucket_files() == {} and not remove_workdir(RUN)


def test_preflight_in_a_bucket(fake_gcs):  # noqa: F811
    check_writable(as_path(RUN))
    assert bucket_files() == {}  # the probe object is deleted
    check_disk_space(as_path(RUN), 10**18)  # a bucket has no free space to check


def test_missing_gcs_clients_are_named(monkeypatch, tmp_path):
    from qkd_jax.run import preflight
    from qkd_jax.train.paths import missing_gcs_clients

    gfile = _find("tensorflow") is not None
    assert ("gcsfs" in missing_gcs_clients()) == (_find("gcsfs") is None and not gfile)
    assert ("google-cloud-storage" in missing_gcs_clients()) == (_find("google.cloud.storage") is None)

    monkeypatch.setattr(preflight, "missing_gcs_clients", lambda: ["gcsfs", "google-cloud-storage"])
    with pytest.raises(WorkdirNotWritableError, match="pip install gcsfs google-cloud-storage"):
        preflight.check_bucket_clients([as_path(tmp_path), as_path(RUN)])
    preflight.check_bucket_clients([as_path(tmp_path)])  # a local workdir needs neither


def test_export_file_in_a_bucket(fake_gcs, tmp_path):  # noqa: F811
    """An integer export saved to gs:// (one object write, no rename) is the same bytes as a local
    save and loads back."""
    import jax.numpy as jnp
    import numpy as np

    from qkd_jax.quant import export as qexport
    from qkd_jax.quant.layers import quantized_layers
    from tests.quant.test_export import Branches, _name, _rules, _student

    specs = [("interval", 2, False, "wa")]
    model = Branches(tuple(_name(s) for s in specs), *quantized_layers(_rules(specs)))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)
    exported = qexport.export_variables(model, _student(model, x)[0], (8, 8, 3))
    out = exported.save(RUN + "/w2a2.npz")
    assert str(out) == RUN + "/w2a2.npz"
    assert set(bucket_files()) == {"bucket/runs/r1/w2a2.npz", "bucket/runs/r1/w2a2.json"}
    local = exported.save(tmp_path / "w2a2.npz")
    assert bucket_files()["bucket/runs/r1/w2a2.npz"] == local.read_bytes()
    loaded = qexport.IntegerExport.load(out)
    assert set(loaded.arrays) == set(exported.arrays)
    for key, value in exported.arrays.items():
        np.testing.assert_array_equal(loaded.arrays[key], value)
    assert qexport.size_report(loaded, str(out)).file_bytes == local.stat().length
