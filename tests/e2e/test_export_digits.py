"""End to end on the bundled digits: train a tiny W2A2 ResNet-20 student with the runner,
export it with the CLI, and check that integer inference predicts what the fake-quant student
predicts on the whole test split (360 images)."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax import data as qdata
from qkd_jax.quant import export as qexport
from qkd_jax.train.loop import run

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
    results = run(config, workdir)
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
    model = qexport.load_model(exported)
    student = results["sqakd"].student  # the runner's own variables, not read through the export
    fake = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(student, images))
    got = np.asarray(qexport.IntegerModel(model, exported)(images))

    np.testing.assert_array_equal(got.argmax(-1), fake.argmax(-1))
    # Logits: float rounding only (see tests/quant/test_export.py RTOL), except examples where an
    # activation lies within ~1e-7 of a rounding boundary and its code flips (rare).
    close = np.all(np.abs(got - fake) <= 1e-5 * np.abs(fake).max(), axis=-1)
    assert close.mean() >= 0.99, f"{(~close).sum()} of 360 examples differ beyond float rounding"
    top1 = 100.0 * np.mean(got.argmax(-1) == labels)
    assert top1 == pytest.approx(results["sqakd"].eval["top1"], abs=1e-6)
