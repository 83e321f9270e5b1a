"""benchmarks/accelerator.py: its FLOP count against an analytic count, and its JSON figures
against each other on a tiny CPU run."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def accelerator():
    spec = importlib.util.spec_from_file_location("accelerator_bench", ROOT / "benchmarks" / "accelerator.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_compiled_flops_match_the_analytic_count_of_a_tiny_conv_net(accelerator):
    """Gradient of sum(conv2(relu(conv1(x)))^2) w.r.t. both kernels: the forward of both convs,
    both kernel gradients and the input gradient of conv2 (x needs none): 2 m1 + 3 m2 multiply-add
    FLOPs, m = 2 N Ho Wo k^2 Cin Cout (VALID padding: XLA counts no padded taps). The elementwise
    work (relu, square, their gradients) adds well under 1%: within 3%."""
    n, h, c0, c1, c2, k = 4, 12, 8, 16, 16, 3
    x = jnp.ones((n, h, h, c0))
    ws = (jnp.ones((k, k, c0, c1)), jnp.ones((k, k, c1, c2)))
    m1 = 2 * n * (h - 2) ** 2 * k * k * c0 * c1
    m2 = 2 * n * (h - 4) ** 2 * k * k * c1 * c2
    loss = lambda ws, x: jnp.sum(_conv(jax.nn.relu(_conv(x, ws[0])), ws[1]) ** 2)  # noqa: E731
    compiled = jax.jit(jax.grad(loss)).lower(ws, x).compile()
    flops = accelerator.compiled_flops(compiled)
    assert abs(flops - (2 * m1 + 3 * m2)) <= 0.03 * (2 * m1 + 3 * m2), (flops, 2 * m1 + 3 * m2)


def test_peak_table(accelerator):
    assert accelerator.peak_tflops("NVIDIA H200", "bfloat16") == 989.0
    assert accelerator.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 495.0
    assert accelerator.peak_tflops("cpu", "float32") is None


@pytest.mark.slow  # runs the step-time benchmark end to end at a tiny size
def test_tiny_run_figures_are_consistent(accelerator, tmp_path):
    out = tmp_path / "bench.json"
    accelerator.main(["--tiny", "--models=resnet18", "--dtypes=bfloat16", "--cases=fp", "--peak-tflops=2",
                      "--no-input-pipeline", f"--out={out}"])
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["model"], row["dtype"], row["case"], row["size"], row["batch"]) == ("resnet18", "bfloat16", "fp", 32, 4 * jax.device_count())
    assert row["compile_s"] > 0 and row["step_s"] > 0 and row["flops"] > 0
    assert row["images_per_s"] == pytest.approx(row["batch"] / row["step_s"], rel=1e-12)
    assert row["mfu"] == pytest.approx(row["flops"] / row["step_s"] / 2e12, rel=1e-12)
    assert result["input_pipeline"] is None and result["meta"]["backend"] == jax.default_backend()


@pytest.mark.slow  # builds, exports and times a ResNet-20 (8 px) in onnxruntime
def test_onnx_benchmark_quick_run(tmp_path):
    """benchmarks/onnx_inference.py --quick: one row per batch, every quantized layer of the
    container model on an integer kernel, images/s = batch / time and the ratio their quotient,
    the int8-container file smaller than the float one."""
    pytest.importorskip("onnxruntime", reason='pip install -e ".[onnx]"')
    spec = importlib.util.spec_from_file_location("onnx_bench", ROOT / "benchmarks" / "onnx_inference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "onnx.json"
    assert module.main(["--quick", f"--out={out}"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["size"], r["batch"]) for r in rows] == [("resnet20", 8, 1), ("resnet20", 8, 4)]
    for r in rows:
        assert r["integer_nodes"] == r["quantized_layers"] == 20
        assert r["ratio"] == pytest.approx(r["int8_images_per_s"] / r["float_images_per_s"], rel=1e-12)
        assert r["int8_bytes"] < r["float_bytes"] / 3  # int8 weights vs float32
