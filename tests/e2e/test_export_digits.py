"""End to end on the bundled digits: train a tiny W2A2 ResNet-20 student with the runner,
export it with the CLI (.npz and ONNX), and check integer inference and onnxruntime against the
fake-quant student on the whole test split (360 images), activation code by activation code.

Both paths compute each quantized layer as an exact integer sum times the same float32 scale
(`layer_quant`, "Integer factorisation"), so on equal inputs their codes are equal. The float
ops that XLA compiles separately in each graph (scaling, bias, BatchNorm, FP stem, residual
adds) may round differently on some processors, so an input can differ by float rounding and
an activation lying within that distance of a rounding boundary can get the neighbouring code;
from then on that image's later activations legitimately differ. The test follows each image
to the first layer where a code differs and checks that every difference there is of that
kind; every code of every other image must be equal, and those images' logits agree to float
rounding."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import data as qdata
from qkd_jax.quant import export as qexport
from qkd_jax.run.export_checkpoint import load_model
from qkd_jax.run.loop import run
from tests.e2e.helpers import mesh

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _tiny_digits_config(data_dir: str):
    """configs/digits_demo.py with one epoch per phase, no 'qat' phase and batches of 256 (8 devices)."""
    spec = importlib.util.spec_from_file_location("_digits_demo", ROOT / "configs" / "digits_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.phase_order = "teacher,calibrate,sqakd"
    del c.phases["qat"]
    for name in ("teacher", "sqakd"):
        c.phases[name].epochs = 1
        c.phases[name].batch_size = 256
        c.phases[name].eval_every_epochs = 1
    c.phases.calibrate.batch_size = 256
    c.dataset.data_dir = data_dir
    c.tensorboard = False
    return c


def _test_split(config):
    info = qdata.dataset_info(config.dataset.name)
    source = qdata.get_source(config.dataset.name, info.eval_split, config.dataset.data_dir)
    loader = qdata.make_eval_loader(source, batch_size=len(source), augment=info.augment,
                                    image_size=info.input_size, mean=info.mean, std=info.std)
    batch = next(iter(loader))
    assert batch["mask"].all()
    return jnp.asarray(batch["image"]), np.asarray(batch["label"])


@pytest.mark.slow
def test_integer_inference_predicts_like_the_fake_quant_student(tmp_path, capsys):
    from qkd_jax.export import main as export_main

    config = _tiny_digits_config(str(tmp_path / "tfds"))
    workdir = tmp_path / "run"
    results = run(config, workdir, mesh=mesh())
    capsys.readouterr()

    out = tmp_path / "sqakd_w2a2.npz"
    assert export_main([f"--workdir={workdir}", "--phase=sqakd", f"--out={out}"]) == 0
    report = capsys.readouterr().out
    assert "layer3_2/conv2" in report and "interval W2A2" in report

    exported = qexport.IntegerExport.load(out)
    assert len(exported.layers) == 18  # every conv under layer*; stem and classifier stay FP
    assert set(exported.manifest["fp"]) == {"params/stem/kernel", "params/classifier/kernel", "params/classifier/bias"}
    sizes = qexport.size_report(exported, str(out))
    assert sizes.params_fp32_bytes / sizes.export_bytes > 12  # 2-bit codes: ~14x smaller

    images, labels = _test_split(config)
    assert images.shape == (360, 16, 16, 1)
    model = load_model(exported)
    student = results["sqakd"].student  # the runner's own variables, not read through the export
    fake, fake_inputs = jax.jit(lambda v, x: _apply_with_layer_inputs(model, v, x, exported.layers))(student, images)
    got, int_inputs = qexport.IntegerModel(model, exported).with_layer_inputs(images)
    fake, got = np.asarray(fake), np.asarray(got)
    assert list(fake_inputs) == list(int_inputs) == list(exported.layers)  # same layers, call order

    # Walk the layers in call order; `clean` = images whose codes agreed in every earlier layer.
    clean = np.ones(len(images), bool)
    for path, entry in exported.layers.items():
        assert entry["method"] == "interval" and entry["a_bits"] == 2
        u_fake = _code_units(np.asarray(fake_inputs[path]), entry)
        u_int = _code_units(np.asarray(int_inputs[path]), entry)
        k_fake, k_int = _round_half_even(u_fake), _round_half_even(u_int)
        # Inputs of clean images agree to float32 rounding (a wrong scale, zero point or BN
        # expression would move them by whole code steps): stated bound 1e-3 code units.
        assert np.abs(u_fake - u_int)[clean].max() <= 1e-3, path
        differs = (k_fake != k_int).reshape(len(images), -1)
        first = clean & differs.any(axis=1)
        if first.any():
            d_fake, d_int = u_fake[first][differs[first]], u_int[first][differs[first]]
            # each differing code is one step apart and its two inputs straddle the rounding
            # boundary between them: only inputs within float rounding of a boundary flip
            boundary = np.floor(np.minimum(d_fake, d_int)) + 0.5
            assert np.all(np.abs(_round_half_even(d_fake) - _round_half_even(d_int)) == 1), path
            assert np.all((np.minimum(d_fake, d_int) <= boundary) & (boundary <= np.maximum(d_fake, d_int))), path
        clean &= ~first
    # Typically no image leaves `clean`; a flip needs an activation within ~1e-6 code units of a
    # boundary. More than a handful would mean the two paths compute different expressions.
    assert clean.sum() >= len(images) - 3, f"{(~clean).sum()} of 360 images had a code flip"
    np.testing.assert_array_equal(got.argmax(-1)[clean], fake.argmax(-1)[clean])
    # Logits of clean images: identical codes, so only the float rounding of the final scaling,
    # BatchNorm and FP classifier: a few float32 ulps of the logits' scale.
    scale = np.abs(fake).max()
    np.testing.assert_allclose(got[clean], fake[clean], rtol=0, atol=1e-5 * scale)
    top1_int = 100.0 * np.mean(got.argmax(-1) == labels)
    top1_fake = 100.0 * np.mean(fake.argmax(-1) == labels)
    assert abs(top1_int - top1_fake) <= 100.0 * (~clean).sum() / len(images)
    assert top1_fake == pytest.approx(results["sqakd"].eval["top1"], abs=100.0 * 1 / 360)
    _check_onnx(workdir, tmp_path, capsys, model, exported, images, labels, fake)


def _check_onnx(workdir, tmp_path, capsys, model, exported, images, labels, fake):
    """The same student through `--format=onnx` in onnxruntime: the fake-quant student's predictions
    on the 360 images (its accuracy), the integer inference's activation codes (boundary rule of
    tests/quant/test_onnx_export.py), and the 18 quantized convs as ConvInteger nodes."""
    from qkd_jax.export import main as export_main
    from qkd_jax.quant.export.onnx_check import optimized_ops, run_onnx
    from qkd_jax.quant.export.onnx_format import to_onnx
    from tests.quant.test_onnx_export import _assert_codes_match, _reference, _run

    out = tmp_path / "sqakd_w2a2.onnx"
    assert export_main([f"--workdir={workdir}", "--phase=sqakd", "--format=onnx", f"--out={out}"]) == 0
    assert "18 ConvInteger" in capsys.readouterr().out
    data = out.read_bytes()
    assert optimized_ops(data)["ConvInteger"] == 18
    got = run_onnx(data, np.asarray(images))
    _, inputs, codes = _reference(model, exported, images)
    clean = _assert_codes_match(exported, inputs, codes, _run(to_onnx(model, exported, debug_inputs=True), images))
    assert clean.sum() >= len(images) - 3, f"{(~clean).sum()} of 360 images had a code flip"
    np.testing.assert_array_equal(got.argmax(-1)[clean], fake.argmax(-1)[clean])
    top1_onnx = 100.0 * np.mean(got.argmax(-1) == labels)
    top1_fake = 100.0 * np.mean(fake.argmax(-1) == labels)
    assert abs(top1_onnx - top1_fake) <= 100.0 * (~clean).sum() / len(images)


def _apply_with_layer_inputs(model, variables, images, exported_layers):
    """Fake-quant logits and the input of each exported quantized layer (flax interceptor)."""
    import flax.linen as nn

    inputs = {}

    def interceptor(next_fun, args, kwargs, ctx):
        path = "/".join(ctx.module.path)
        if ctx.method_name == "__call__" and path in exported_layers and isinstance(ctx.module, (nn.Conv, nn.Dense)):
            inputs[path] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, images, train=False)
    return out, inputs


def _code_units(x: np.ndarray, entry: dict) -> np.ndarray:
    """The interval activation quantizer's pre-rounding value u = x_n (L - 1), in float64."""
    p = entry["activation"]["params"]
    levels = 2 ** entry["a_bits"]
    x_n = np.clip((x.astype(np.float64) - p["a_lower"]) / (p["a_upper"] - p["a_lower"]), 0.0, 1.0)
    return x_n * (levels - 1)


def _round_half_even(u: np.ndarray) -> np.ndarray:
    return np.round(u)
