"""import_teacher: a torchvision-layout weights file becomes a completed teacher phase that the
runner reads back (not trains) through --config.teacher_checkpoint and distils a student from;
the command line's errors are one line with exit code 2.

The weights are random flax variables of ResNet-18 exported to torchvision's layout, stored as
.npz (numpy) and .safetensors (written byte by byte); the run is the ImageNet SQAKD config
shrunk to a few steps on `tfds.testing.mock_data`.
"""

from __future__ import annotations

import json
import pathlib
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from qkd_jax.models import export_torchvision, get_model
from qkd_jax.run import loop
from qkd_jax.run.import_teacher import import_teacher
from qkd_jax.run.import_teacher_cli import main
from qkd_jax.train import parallel
from qkd_jax.train.checkpoint import PhaseCheckpointer
from tests.e2e.test_paper_configs_smoke import _load, _shrink

MODEL, SIZE, EXAMPLES = "resnet18", 32, 32


def _config():
    config = _shrink(_load("imagenet_resnet18.py:sqakd,w4a4"), image_size=SIZE)
    config.log_every_steps = 100
    # mock_data cannot produce JPEG bytes without TensorFlow (the ImageNet recipes' data.jpeg
    # path reads them); the JPEG path runs on real JPEGs in tests/e2e/test_jpeg_runner.py.
    config.data.jpeg = False
    return config


@pytest.fixture(scope="module")
def variables() -> dict:
    """Random ResNet-18 variables (1000 classes) with non-trivial BatchNorm statistics."""
    v = get_model(MODEL, 1000).init(jax.random.key(3), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    leaves, tree = jax.tree.flatten(v["batch_stats"])
    keys = jax.random.split(jax.random.key(4), len(leaves))
    stats = [jax.random.uniform(k, x.shape, minval=0.5, maxval=1.5) for k, x in zip(keys, leaves)]
    return {"params": v["params"], "batch_stats": jax.tree.unflatten(tree, stats)}


def _write_safetensors(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64"}
    header, blobs, offset = {}, [], 0
    for name, value in arrays.items():
        raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[value.dtype], "shape": list(value.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


@pytest.mark.slow  # the suite's one ImageNet-style run on mock data (a few steps of ResNet-18 W4A4)
def test_imported_teacher_is_read_back_and_distilled_from(variables, tmp_path, capsys):
    state_dict = export_torchvision(MODEL, variables)
    weights = tmp_path / "r18.safetensors"
    _write_safetensors(weights, state_dict)
    config = _config()
    config.dataset.data_dir = str(tmp_path / "no_data")  # mock_data must be what is read
    mesh = parallel.make_mesh(jax.devices()[:2])
    with tfds.testing.mock_data(num_examples=EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        out = import_teacher(weights, tmp_path / "teacher", model=MODEL, config=config)
        ckpt = PhaseCheckpointer(out)
        meta = ckpt.read_meta()
        ckpt.close()
        assert meta["completed"] is True and meta["step"] == 0 and meta["phase"] == "teacher"
        assert meta["imported_from"] == str(weights.absolute())
        assert meta["eval"]["count"] == EXAMPLES  # evaluated on the (mock) eval split
        assert meta["record"]["model.name"] == MODEL and meta["record"]["dataset.image_size"] == SIZE

        config.teacher_checkpoint = str(out)
        capsys.readouterr()
        results = loop.run(config, tmp_path / "run", mesh=mesh)
    printed = capsys.readouterr().out
    assert f"[teacher] already completed at step 0: read from {out}" in printed
    assert "[teacher] teacher:" not in printed  # no training line for the teacher
    assert list(results) == ["teacher", "calibrate", "student"]
    teacher = results["teacher"].student
    jax.tree.map(np.testing.assert_array_equal, teacher["params"], jax.device_get(variables["params"]))
    jax.tree.map(np.testing.assert_array_equal, teacher["batch_stats"], jax.device_get(variables["batch_stats"]))
    assert results["teacher"].eval == meta["eval"]
    assert results["student"].eval["count"] == EXAMPLES
    assert not (tmp_path / "run" / "teacher").exists()  # the imported phase is not copied or retrained


@pytest.fixture(scope="module")
def npz(variables, tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("weights") / "r18.npz"
    np.savez(path, **export_torchvision(MODEL, variables))
    return path


def _cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err
    return rc, err


def test_npz_without_config_records_the_imagenet_teacher(npz, tmp_path, capsys):
    rc, err = _cli(capsys, f"--weights={npz}", f"--model={MODEL}", f"--out={tmp_path / 't'}", "--no_eval")
    assert rc == 0, err
    ckpt = PhaseCheckpointer(tmp_path / "t")
    meta = ckpt.read_meta()
    ckpt.close()
    assert meta["eval"] == {} and meta["completed"] is True
    assert {k: meta["record"][k] for k in ("dataset.name", "model.name", "model.num_classes",
                                           "dataset.image_size")} == {
        "dataset.name": "imagenet2012", "model.name": MODEL, "model.num_classes": 1000,
        "dataset.image_size": 224}
    # A second import into the same directory is refused.
    rc, err = _cli(capsys, f"--weights={npz}", f"--model={MODEL}", f"--out={tmp_path / 't'}", "--no_eval")
    assert rc == 2 and err.count("\n") == 1 and "already holds a checkpoint" in err


def test_cli_errors_are_one_line_with_exit_code_2(npz, tmp_path, capsys, monkeypatch):
    out = f"--out={tmp_path / 'o'}"
    cases = [
        ((f"--weights={npz}", "--model=resnet7", out), "unknown model 'resnet7'"),
        ((f"--weights={tmp_path / 'none.npz'}", f"--model={MODEL}", out), "no weights file"),
        ((f"--weights={npz}", f"--model={MODEL}", out, "--num_classes=10"),
         "has a 1000-class classifier but the config expects 10 classes"),
    ]
    (tmp_path / "w.pth").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    cases.append(((f"--weights={tmp_path / 'w.pth'}", f"--model={MODEL}", out), r"needs torch (pip install torch)"))
    for args, message in cases:
        rc, err = _cli(capsys, *args)
        assert rc == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, (args, err)
    assert not (tmp_path / "o").exists()  # nothing written on an error


def test_empty_or_damaged_weights_files_are_one_line_with_exit_code_2(tmp_path, capsys):
    out = f"--out={tmp_path / 'o'}"
    np.savez(tmp_path / "empty.npz")  # a valid archive with no arrays
    (tmp_path / "zero.npz").write_bytes(b"")  # numpy: EOFError
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not a zip archive")  # zipfile: BadZipFile
    cases = [("empty.npz", "empty.npz holds no arrays"),
             ("zero.npz", "cannot read {}/zero.npz (EOFError: No data left in file)"),
             ("junk.npz", "cannot read {}/junk.npz (BadZipFile: ")]
    for name, message in cases:
        rc, err = _cli(capsys, f"--weights={tmp_path / name}", f"--model={MODEL}", out, "--no_eval")
        assert rc == 2, (name, err)
        assert err.count("\n") == 1 and err.startswith("error: ") and message.format(tmp_path) in err, (name, err)
    assert not (tmp_path / "o").exists()
