"""The demo's deployment step (run/demo_deploy.py) on a run directory: the int8 ONNX student's
top-1 in onnxruntime against the JAX integer inference's on the same images, the files it writes,
and the one-line hint without the onnx extra."""

from __future__ import annotations

import pathlib
import re
import sys
import types

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The digits demo's config (16x16, ResNet-20 interval W2A2) with an initialised, untrained
    'student' phase checkpoint saved by the run's checkpointer (test_export.py's fixture at the
    demo's own image size: the deployment evaluates the real test split)."""
    import importlib.util

    import jax
    import jax.numpy as jnp
    import optax

    from qkd_jax.run import build
    from qkd_jax.train.checkpoint import PhaseCheckpointer
    from qkd_jax.train.state import create_train_state

    root = tmp_path_factory.mktemp("run")
    spec = importlib.util.spec_from_file_location("_digits_demo", ROOT / "configs" / "digits_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.dataset.data_dir = str(root / "tfds")
    model = build.student_network(config).local_model
    v = jax.jit(lambda k: model.init(k, jnp.zeros((1, *build.input_shape(config))), train=False))(jax.random.key(3))
    v = {k: v[k] for k in ("params", "batch_stats")}
    state = create_train_state(apply_fn=model.apply, variables=v, tx=optax.sgd(0.1), rng=jax.random.key(0))
    ckpt = PhaseCheckpointer(root / "student")
    ckpt.save(state, meta={"phase": "student", "kind": "student", "completed": True, "config": config.to_json()})
    ckpt.close()
    return root, config


def test_without_onnxruntime_the_demo_says_how_to_install_it(monkeypatch, tmp_path):
    from qkd_jax.run.demo_deploy import deployment_report

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    text = deployment_report(tmp_path, None, {})
    assert text.count("\n") == 0 and 'pip install -e ".[onnx]"' in text


@pytest.mark.slow  # exports twice and prepares the digits split
def test_deployment_report(workdir):
    pytest.importorskip("onnxruntime")
    from qkd_jax.quant import export as qexport
    from qkd_jax.run.demo_deploy import _eval_split, deployment_report
    from qkd_jax.run.export_checkpoint import export_checkpoint, load_model

    root, config = workdir
    results = {"student": types.SimpleNamespace(eval={"top1": 12.5})}
    text = deployment_report(root, config, results, phase="student")
    exported = export_checkpoint(root, "student")
    images, labels = _eval_split(config)
    assert images.shape == (360, 16, 16, 1)
    logits = np.asarray(qexport.IntegerModel(load_model(exported), exported)(images))
    expected = 100.0 * np.mean(logits.argmax(-1) == labels)
    onnx_top1 = float(re.search(r"onnxruntime int8 ONNX top-1 +([\d.]+) %", text).group(1))
    assert onnx_top1 == pytest.approx(expected, abs=0.005 + 100.0 / 360)  # one boundary flip at most
    assert "12.50 %" in text and "18 ConvInteger + 0 MatMulInteger" in text
    sizes = {k: (root / "deploy" / f"student{k}").stat().st_size for k in (".npz", "_float.onnx", "_int8.onnx")}
    assert sizes["_int8.onnx"] < sizes["_float.onnx"] / 3
    assert f"float ONNX {sizes['_float.onnx']:,} B" in text and f".npz {sizes['.npz']:,} B" in text
