"""SQuaT through the runner: the CIFAR-10 ResNet-20 'squat,w2a2' config on tfds mock data (as
`--config=configs/cifar10_resnet20.py:squat,w2a2` loads it, shrunk like the paper-config smoke
runs), and an interrupted digits SQuaT phase (LSQ W2A2) resumed to the uninterrupted run's arrays."""

from __future__ import annotations

import math

import jax
import pytest
import tensorflow_datasets as tfds

from qkd_jax.run import loop, recipes
from qkd_jax.run.config_schema import optimizer_config, phase
from qkd_jax.run.interrupt import Interrupted
from qkd_jax.train import parallel
from tests.e2e.helpers import (
    _set_phases,
    assert_trees_identical,
    finalized_steps,
    interrupt_after,
    read_meta,
    read_metrics,
    read_state,
    teacher_only,
)
from tests.e2e.test_paper_configs_smoke import MOCK_EXAMPLES, _check, _load, _shrink


def test_cifar10_squat_config_runs_on_mock_data(tmp_path):
    config = _shrink(_load("cifar10_resnet20.py:squat,w2a2"))
    config.dataset.data_dir = str(tmp_path / "no_data")  # mock_data must be what is read
    mesh = parallel.make_mesh(jax.devices()[:2])
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE):
        results = loop.run(config, tmp_path / "run", mesh=mesh)
        _check(config, tmp_path / "run", results, MOCK_EXAMPLES, mesh)
    train = [r for r in read_metrics(tmp_path / "run") if r["phase"] == "student" and r["kind"] == "train"]
    assert train and "ce" not in train[0]  # label-free
    for r in train:  # loss = KL + 1.0 * MSE at the tap, a float32 sum of two terms
        assert math.isfinite(r["squat"]) and 0.0 <= r["squat"] <= 1.0
        assert r["loss"] == pytest.approx(r["kl"] + r["squat"], rel=1e-5, abs=1e-6)


def _squat_digits_config():
    """Digits teacher (0 epochs) -> calibrate -> squat (LSQ W2A2, 1 epoch of 11 steps, batch 128,
    a checkpoint every 3 steps)."""
    c = teacher_only(epochs=0, batch_size=128, checkpoint_every_steps=3, log_every_steps=1)
    c.quant.method, c.quant.w_bits, c.quant.a_bits, c.quant.preset = "lsq", 2, 2, "sqakd_cifar"
    squat = recipes.squat_phase("squat", epochs=1, batch_size=128,
                                weights=optimizer_config(optimizer="adam", learning_rate=1e-3, schedule="cosine_epoch"),
                                quant_params=optimizer_config(optimizer="adam", learning_rate=1e-4,
                                                              schedule="cosine_epoch"))
    _set_phases(c, [("teacher", c.phases.teacher),
                    ("calibrate", phase("calibrate", init_from="teacher", batch_size=128)), ("squat", squat)])
    return c


def test_interrupted_squat_phase_resumes_to_identical_state(tmp_path, monkeypatch, capsys):
    mesh = parallel.make_mesh(jax.devices()[:1])
    config = _squat_digits_config()
    reference = tmp_path / "reference"
    loop.run(config, reference, mesh=mesh)
    workdir = tmp_path / "work"
    with monkeypatch.context() as m:
        interrupt_after(m, 5)
        with pytest.raises(Interrupted) as info:
            loop.run(config, workdir, mesh=mesh)
    assert (info.value.phase, info.value.step) == ("squat", 5)
    assert not read_meta(workdir / "squat" / "5")["completed"]
    capsys.readouterr()
    loop.run(config, workdir, mesh=mesh)
    assert "[squat] resuming from step 5" in capsys.readouterr().out
    last = finalized_steps(reference / "squat")[-1]
    assert last == finalized_steps(workdir / "squat")[-1] == 11
    assert_trees_identical(read_state(workdir / "squat" / str(last)), read_state(reference / "squat" / str(last)))
    assert read_meta(workdir / "squat" / str(last)).get("eval") == read_meta(reference / "squat" / str(last)).get("eval")
    train = [r for r in read_metrics(reference) if r["phase"] == "squat" and r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 12)) and all(r["squat"] > 0 for r in train)
