"""A digits teacher phase run with `--workdir=gs://bucket/...` (tests/fake_bucket.py: the bucket
lives in memory behind etils.epath's fsspec backend).

Orbax writes array data through TensorStore's own GCS driver, which no in-memory filesystem
reaches, so the phase checkpoints are mapped to a local directory (`_local_checkpoints`); every
other file of the run (lock, config.json, metrics.jsonl, summary.json, the write probe) goes to
the bucket, and nothing may appear in the local working directory.
"""

from __future__ import annotations

import json
import os

from qkd_jax.run import loop, preflight, rerun
from qkd_jax.train import checkpoint, metrics
from tests.e2e import helpers
from tests.fake_bucket import bucket_files, fake_gcs  # noqa: F401  (fixture)

RUN = "gs://bucket/runs/digits"


def _local_checkpoints(monkeypatch, root) -> None:
    """PhaseCheckpointer on gs://B/K writes to root/B/K instead (orbax cannot reach the fake bucket)."""
    real = checkpoint.PhaseCheckpointer

    def mapped(directory, **kwargs):
        text = os.fspath(directory)
        assert text.startswith("gs://"), text  # every phase directory is inside the bucket workdir
        return real(root / text[len("gs://"):], **kwargs)

    for module in (loop, rerun):
        monkeypatch.setattr(module, "PhaseCheckpointer", mapped)


def test_teacher_phase_with_a_bucket_workdir(fake_gcs, tmp_path, monkeypatch, capsys):  # noqa: F811
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    _local_checkpoints(monkeypatch, tmp_path / "ckpt")
    # gcsfs and google-cloud-storage are stood in for by the fake bucket and the local checkpoints.
    monkeypatch.setattr(preflight, "missing_gcs_clients", list)
    # tensorboardX's gs:// writer would need google-cloud-storage and a real bucket: the run must
    # then go on without events and say so (made the case whether or not the client is installed).
    monkeypatch.setattr(metrics, "has_module", lambda name: name != "google.cloud.storage")
    config = helpers.teacher_only(epochs=1, batch_size=64, tensorboard=True)  # 22 steps
    results = loop.run(config, RUN, mesh=helpers.mesh())
    out = capsys.readouterr().out
    files = bucket_files()
    prefix = "bucket/runs/digits/"
    assert set(files) == {prefix + n for n in ("config.json", "metrics.jsonl", "summary.json")}
    assert json.loads(files[prefix + "config.json"])["phase_order"] == "teacher"
    records = [json.loads(line) for line in files[prefix + "metrics.jsonl"].decode().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 23))
    final = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in final] == [22]
    summary = json.loads(files[prefix + "summary.json"])
    assert summary["teacher"]["eval"]["top1"] == final[0]["top1"] == results["teacher"].eval["top1"]
    assert "no TensorBoard events in gs://bucket/runs/digits/tb (install google-cloud-storage" in out
    assert helpers.finalized_steps(tmp_path / "ckpt" / "bucket" / "runs" / "digits" / "teacher")[-1] == 22
    assert list(cwd.iterdir()) == []  # nothing written locally under a 'gs:' directory

    # Rerun: the lock is taken again (released by the first run), the phase is read back.
    again = loop.run(config, RUN, mesh=helpers.mesh())
    assert "[teacher] already completed at step 22" in capsys.readouterr().out
    assert again["teacher"].eval == results["teacher"].eval
    records = [json.loads(line) for line in bucket_files()[prefix + "metrics.jsonl"].decode().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 23))
