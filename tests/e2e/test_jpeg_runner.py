"""The runner on a prepared `imagenet2012` of synthetic JPEGs with `data.jpeg`: uint8 batches from
grain worker processes, normalised in the step, evaluated like the host-normalised float path.

The model is SqueezeNet 1.0, which has no BatchNorm: a calibrate phase after the teacher (PACT
W4A4, first and last layer at 8 bits) must accept the teacher's empty 'batch_stats' collection
(copying it into the student once failed)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from benchmarks import synthetic_imagenet
from qkd_jax.data import dataset_info, get_source, make_eval_loader
from qkd_jax.run import build, loop
from qkd_jax.run.config_schema import phase
from qkd_jax.train import parallel
from qkd_jax.train.step import eval_step
from tests.e2e.helpers import read_metrics, teacher_only

TRAIN, VAL, BATCH, SIZE = 32, 24, 16, 32


@pytest.mark.slow
def test_jpeg_path_trains_and_evaluates_like_the_float_path(tmp_path):
    data_dir = tmp_path / "data"
    synthetic_imagenet.write_dataset(str(data_dir), TRAIN, seed=3, val_images=VAL)
    c = teacher_only(epochs=1, batch_size=BATCH, lr=0.01)
    c.dataset.name, c.dataset.data_dir, c.dataset.image_size = "imagenet2012", str(data_dir), SIZE
    c.dataset.eval_batch_size = BATCH
    c.model.name = "squeezenet1_0"
    c.data.jpeg, c.data.num_workers, c.data.prefetch = True, 1, 2
    c.quant.method, c.quant.preset, c.quant.w_bits, c.quant.a_bits = "pact", "first_last_8bit", 4, 4
    c.phase_order = "teacher,calibrate"
    c.phases.calibrate = phase("calibrate", init_from="teacher", batch_size=BATCH)
    mesh = parallel.make_mesh(jax.devices()[:2])
    results = loop.run(c, tmp_path / "work", mesh=mesh)
    assert results["teacher"].student["batch_stats"] == {} == results["calibrate"].student["batch_stats"]
    assert results["calibrate"].eval["count"] == VAL
    train = [r for r in read_metrics(tmp_path / "work") if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(np.isfinite(r["loss"]) for r in train)
    ev = results["teacher"].eval
    assert ev["count"] == VAL
    # The same variables evaluated on host-normalised float32 batches (same fast decode) with
    # the plain eval step: the run's uint8 + device normalisation must give the same sums.
    info = dataset_info("imagenet2012")
    model = build.teacher_network(c).train_model
    fn = parallel.compile_eval_step(functools.partial(eval_step, apply_fn=model.apply), mesh)
    variables = parallel.replicate(results["teacher"].student, mesh)
    totals = {}
    for batch in make_eval_loader(get_source("imagenet2012", "validation", str(data_dir), encoded=True),
                                  batch_size=BATCH, augment="imagenet", image_size=SIZE, mean=info.mean,
                                  std=info.std, jpeg=True):
        assert batch["image"].dtype == np.float32
        sums = jax.device_get(fn(variables, parallel.shard_batch(batch, mesh)))
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    assert totals["count"] == VAL
    np.testing.assert_allclose(100.0 * totals["top1"] / VAL, ev["top1"], atol=1e-9)
    np.testing.assert_allclose(totals["loss"] / VAL, ev["loss"], rtol=1e-5)
