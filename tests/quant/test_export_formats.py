"""`python -m qkd_jax.export --format=onnx|stablehlo` on a run directory (the digits ResNet-20,
interval W2A2, 8x8 inputs of test_export.py's `workdir` fixture): what the files hold, checked
against the JAX integer inference of the same checkpoint, and the one-line errors (exit 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from qkd_jax.quant import export as qexport
from qkd_jax.run.export_checkpoint import export_checkpoint, load_model
from tests.quant.test_export import workdir  # noqa: F401  (the module-scoped run directory)


@pytest.fixture(scope="module")
def reference(workdir):  # noqa: F811
    """The checkpoint's export, its model and the integer inference's logits on 6 random images."""
    root, _ = workdir
    exported = export_checkpoint(root, "student")
    model = load_model(exported)
    x = np.random.default_rng(7).normal(size=(6, 8, 8, 1)).astype(np.float32)
    return exported, model, x, np.asarray(qexport.IntegerModel(model, exported)(x))


def _main(*args) -> int:
    from qkd_jax.export import main

    return main(list(args))


def test_onnx_cli(workdir, reference, tmp_path, capsys):  # noqa: F811
    """--format=onnx: onnxruntime gives the integer inference's logits and top-1, runs all 18
    quantized convs as ConvInteger (the report says so), leaves no temporary file; strict types are
    smaller and need opset 25 (2-bit activations: UINT2)."""
    ort = pytest.importorskip("onnxruntime")
    root, _ = workdir
    exported, model, x, ref = reference
    out = tmp_path / "student.onnx"
    assert _main(f"--workdir={root}", "--phase=student", "--format=onnx", f"--out={out}") == 0
    text = capsys.readouterr().out
    assert "18 integer layers" in text and "18 ConvInteger" in text and "32/32" in text
    assert sorted(os.listdir(tmp_path)) == ["student.onnx"]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"images": x})[0]
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.slow
def test_onnx_cli_strict_types(workdir, tmp_path, capsys):  # noqa: F811
    """--onnx-types=strict: smaller than the container file, opset 25 (UINT2 activations)."""
    root, _ = workdir
    out = tmp_path / "student.onnx"
    assert _main(f"--workdir={root}", "--phase=student", "--format=onnx", f"--out={out}") == 0
    strict = tmp_path / "strict.onnx"
    assert _main(f"--workdir={root}", "--phase=student", "--format=onnx", "--onnx-types=strict",
                 f"--out={strict}") == 0
    import onnx

    assert onnx.load(str(strict)).opset_import[0].version == 25
    assert strict.stat().st_size < out.stat().st_size


def _unfinished(root, tmp_path):
    """A copy of the run whose 'student' checkpoint is marked not completed."""
    import shutil

    other = tmp_path / "run"
    shutil.copytree(root / "student", other / "student")
    meta_file = next((other / "student").glob("*/meta/metadata"))
    meta = json.loads(meta_file.read_text())
    meta["completed"] = False
    meta_file.write_text(json.dumps(meta))
    return other


@pytest.mark.parametrize("case, message", [
    ("suffix", "--out must name a .onnx file for --format=onnx"),
    ("teacher", "is a 'teacher' phase"),
    ("unfinished", "phase 'student' has not completed"),
    ("no_onnx", 'pip install -e ".[onnx]"'),
    ("bucket", "--format=stablehlo writes a local file"),
])
def test_bad_input_is_one_line_and_exit_2(workdir, tmp_path, capsys, monkeypatch, case, message):  # noqa: F811
    if case in ("teacher", "unfinished"):
        pytest.importorskip("onnx")  # checked before the checkpoint: without it the pip hint comes first
    root, _ = workdir
    fmt, out, phase = "onnx", tmp_path / "m.onnx", "student"
    if case == "suffix":
        out = tmp_path / "m.npz"
    elif case == "teacher":
        phase = "teacher"
    elif case == "unfinished":
        root = _unfinished(root, tmp_path)
    elif case == "no_onnx":
        monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    elif case == "bucket":
        fmt, out = "stablehlo", "gs://bucket/m.stablehlo"
    assert _main(f"--workdir={root}", f"--phase={phase}", f"--format={fmt}", f"--out={out}") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not any(p.suffix in (".onnx", ".stablehlo") for p in tmp_path.rglob("*"))


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    """A write that fails before its rename leaves the previous file whole and no temporary file."""
    from qkd_jax.quant.export import atomic

    path = tmp_path / "m.onnx"
    atomic.write_bytes_atomic(path, b"old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        atomic.write_bytes_atomic(path, b"new model")
    assert path.read_bytes() == b"old" and sorted(os.listdir(tmp_path)) == ["m.onnx"]


def _stablehlo(workdir, tmp_path):  # noqa: F811
    root, _ = workdir
    out = tmp_path / "student.stablehlo"
    assert _main(f"--workdir={root}", "--phase=student", "--format=stablehlo", f"--out={out}") == 0
    return out


def test_stablehlo_artifact(reference):
    """The library call (cpu only, to keep the fast tier cheap): the artifact deserializes with
    jax.export, takes any batch size and returns the integer inference's logits."""
    from jax import export

    from qkd_jax.quant.export.stablehlo_format import to_stablehlo

    exported, model, x, ref = reference
    artifact = export.deserialize(to_stablehlo(model, exported, platforms=("cpu",)))
    for n in (6, 2):
        np.testing.assert_allclose(np.asarray(artifact.call(x[:n])), ref[:n], rtol=0, atol=1e-6 * np.abs(ref).max())


@pytest.mark.slow
def test_stablehlo_loads_without_qkd_jax(workdir, reference, tmp_path, capsys):  # noqa: F811
    """The CLI's artifact is lowered for cpu, cuda and tpu; a fresh Python process that never
    imports qkd_jax reloads it and gets the integer inference's logits."""
    from jax import export

    exported, model, x, ref = reference
    path = _stablehlo(workdir, tmp_path)
    assert export.deserialize(path.read_bytes()).platforms == ("cpu", "cuda", "tpu")
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np\n"
        "from jax import export\n"
        f"a = export.deserialize(open({str(path)!r}, 'rb').read())\n"
        f"y = np.asarray(a.call(np.load({str(tmp_path / 'x.npy')!r})))\n"
        f"np.save({str(tmp_path / 'y.npy')!r}, y)\n"
        "assert not any(m == 'qkd_jax' or m.startswith('qkd_jax.') for m in sys.modules), 'qkd_jax imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, env=env, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, rtol=0, atol=1e-6 * np.abs(ref).max())
