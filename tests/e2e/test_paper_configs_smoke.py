"""Smoke runs of the paper config files themselves, shrunk to a few steps.

Each config file is loaded as `--config=configs/X.py:ARG` loads it, then shrunk (1 epoch per
phase, batch 16, 32 px inputs, learning rates capped at 1e-3) without touching its phase
structure, objectives, optimizer kinds and schedules, quantizer method or precision preset, and run
end to end: CIFAR-10 on `tfds.testing.mock_data`, Tiny-ImageNet on a small fake image folder.
Every phase must finish with an evaluation over the whole (mock) eval split, and its newest
checkpoint, read back from disk and evaluated again, must give exactly the logged evaluation
(the saved state is the state that was evaluated). The ImageNet config runs in
tests/run/test_import_teacher.py (from an imported teacher), the QKD phase chain in
test_runner_mock.py.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from qkd_jax.run import loop
from qkd_jax.run.context import RunContext
from qkd_jax.run.evaluate import evaluate
from qkd_jax.train import parallel
from tests.e2e.helpers import finalized_steps, read_state

ROOT = pathlib.Path(__file__).resolve().parents[2]
MOCK_EXAMPLES = 32
BATCH = 16


def _load(spec: str):
    name, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_smoke_{name[:-3]}", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)


def _shrink(config, image_size: int = 0):
    config.dataset.eval_batch_size = BATCH
    if image_size:
        config.dataset.image_size = image_size
    config.log_every_steps = 1
    config.checkpoint_every_steps = 1000
    config.tensorboard = False
    config.teacher_checkpoint = ""
    config.data.num_workers = 0  # a few tiny batches: worker start-up would dominate
    for name in config.phase_order.split(","):
        ph = config.phases[name]
        ph.epochs = 1
        ph.batch_size = BATCH
        for group in ("weights", "quant_params", "teacher_opt"):
            ph[group].warmup_steps = min(ph[group].warmup_steps, 1)
            # Two steps on a few tiny images: capped rates keep every config's smoke run
            # well-conditioned (the recipes' rates are asserted in tests/configs; the
            # MobileNetV2 LSQ W3A3 recipe also stays finite at its own 4e-3 on these images).
            ph[group].learning_rate = min(ph[group].learning_rate, 1e-3)
    return config


def _write_tiny_imagenet(root: pathlib.Path, per_class: int = 11) -> None:
    """A Tiny-ImageNet-200 folder with 3 classes of textured 64x64 JPEGs (a class colour plus
    pixel noise).

    Not solid colours: a batch of constant images has almost no spatial variance, so every
    training-mode BatchNorm of a deep net divides by ~sqrt(eps) and the gradients grow by up to
    1/sqrt(1e-5) ~ 316 per layer. MobileNetV2 (52 BatchNorms) then reached gradients ~1e18 on
    the second step and overflowed float32 on some processors: a property of the data, not of
    the recipe (real images have texture)."""
    base = root / "tiny-imagenet-200"
    wnids = ["n01", "n02", "n03"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    rng = np.random.default_rng(0)
    rows = []

    def image(c: int) -> Image.Image:
        colour = np.asarray([200 if i == c else 60 for i in range(3)], np.float64)
        pixels = np.clip(colour + rng.normal(0.0, 40.0, size=(64, 64, 3)), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")

    for c, wnid in enumerate(wnids):
        folder = base / "train" / wnid / "images"
        folder.mkdir(parents=True)
        for k in range(per_class):
            image(c).save(folder / f"{wnid}_{k}.JPEG", quality=90)
            name = f"val_{c}_{k}.JPEG"
            image(c).save(base / "val" / "images" / name, quality=90)
            rows.append(f"{name}\t{wnid}\t0\t0\t63\t63\n")
    (base / "val" / "val_annotations.txt").write_text("".join(rows))


def _check(config, workdir, results, expected_count: int, mesh) -> None:
    assert list(results) == config.phase_order.split(",")
    ctx = RunContext(config=config, workdir=workdir, mesh=mesh, writer=None, sources=loop.open_datasets(config))
    for name, res in results.items():
        assert res.eval["count"] == expected_count, name
        state = read_state(workdir / name / str(finalized_steps(workdir / name)[-1]))
        variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {})}
        if state.get("quant_delta"):
            variables["quant_delta"] = state["quant_delta"]
        net = ctx.network(config.phases[name].kind)
        assert evaluate(ctx, net.train_model, variables) == res.eval, name


def test_cifar10_paper_config_runs_on_mock_data(tmp_path):
    config = _shrink(_load("cifar10_resnet20.py:sqakd,w2a2"))
    config.dataset.data_dir = str(tmp_path / "no_data")  # mock_data must be what is read
    mesh = parallel.make_mesh(jax.devices()[:2])
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        results = loop.run(config, tmp_path / "run", mesh=mesh)
        _check(config, tmp_path / "run", results, MOCK_EXAMPLES, mesh)


# ResNet-18 rather than the MobileNetV2 config here: MobileNetV2's compile alone took 150 s of the
# slow tier, and its layers are checked without a run (depthwise and signed inputs in
# tests/models, its released quantizers in tests/quant, its config in tests/configs).
@pytest.mark.parametrize("spec", ["tiny_imagenet_resnet18.py:sqakd,lsq,w3a3",
                                  # released DoReFa: full-range (32-bit) stem and classifier
                                  "tiny_imagenet_vgg11.py:sqakd,dorefa,w4a4"])
def test_tiny_imagenet_config_runs_on_an_image_folder(spec, tmp_path):
    _write_tiny_imagenet(tmp_path / "data")
    config = _shrink(_load(spec), image_size=32)
    assert config.quant.variant == "released"
    config.dataset.data_dir = str(tmp_path / "data")
    mesh = parallel.make_mesh(jax.devices()[:2])
    results = loop.run(config, tmp_path / "run", mesh=mesh)
    _check(config, tmp_path / "run", results, 33, mesh)  # 3 classes x 11 val images
    table = (tmp_path / "run" / "precision.txt").read_text()
    assert f"{config.quant.method}_released" in table
