"""Every feature-distillation method through the runner on digits, and exact resumes of the
phases whose auxiliary state the checkpoint must carry.

One run of `helpers.feature_suite_config()` (in-process, ONE CPU device, made once per test run:
the module's tests go to one xdist worker) trains teacher (0 epochs) -> calibrate -> crd, cktf,
ft_paraphraser, at, nst, sp, rkd, fitnet, cc, vid, ft, fsp_init, fsp (1 epoch of 11 steps each,
batch 128, a checkpoint every 3 steps). Each baseline must log its feature term, whose weighted
sum with the cross-entropy is the logged loss, and record beta and the criterion; FT's student
phase holds the trained paraphraser frozen; FSP's init phase leaves the classifier untouched.

The resume test runs the phases up to ft_paraphraser again in another workdir (same positions in
phase_order, so the same seeds and programs) and interrupts it in the middle of crd, then of cktf,
then of ft_paraphraser (`helpers.interrupt_after`: the runner's own stop-at-a-step-boundary path);
each rerun resumes from the interrupted checkpoint, and the final arrays (student, optimizer, the
criteria's heads and memory banks, the paraphraser) equal the uninterrupted run's bit for bit.
A real SIGKILL of a CLI run is tested once, in test_resume.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import jax
import numpy as np
import pytest

from qkd_jax.run import loop, recipes
from qkd_jax.run.interrupt import Interrupted
from qkd_jax.train import parallel
from tests.e2e.helpers import (
    FEATURE_SUITE_BASELINES,
    FEATURE_SUITE_INTERRUPTED,
    assert_trees_identical,
    feature_suite_config,
    finalized_steps,
    flat,
    interrupt_after,
    read_meta,
    read_metrics,
    read_state,
    state_keys,
)

TOTAL = 11  # 1437 digits // 128, one epoch
# The baselines of the SQAKD paper's comparison, named here so that a recipe removed from
# recipes.FEATURE_BASELINES fails this test instead of shrinking it.
BASELINES = ("at", "nst", "sp", "rkd", "crd", "fitnet", "cc", "vid", "cktf")


def _mesh():
    return parallel.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("feature_suite") / "work"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        loop.run(feature_suite_config(), workdir, mesh=_mesh())
    return workdir, out.getvalue()


def test_every_baseline_trains_its_feature_term(suite):
    workdir, stdout = suite
    assert sorted(FEATURE_SUITE_BASELINES) == sorted(BASELINES) and set(BASELINES) <= set(recipes.FEATURE_BASELINES)
    records = read_metrics(workdir)
    summary = json.loads((workdir / "summary.json").read_text())
    table = stdout[stdout.index("\nSummary ("):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}
    for token in BASELINES:
        criterion, beta = recipes.FEATURE_BASELINES[token]
        train = [r for r in records if r["phase"] == token and r["kind"] == "train"]
        assert [r["step"] for r in train] == list(range(1, TOTAL + 1)), token
        for r in train:
            ce, term, loss = r["ce"], r[criterion], r["loss"]
            assert math.isfinite(term) and term >= 0, (token, term)
            # loss = gamma * CE + beta * L_feature (gamma 1, alpha 0): float32 sums of two terms.
            assert loss == pytest.approx(ce + beta * term, rel=1e-5, abs=1e-6), (token, r)
        assert "kl" not in train[0]  # alpha 0: no logit KL term
        last = finalized_steps(workdir / token)[-1]
        assert last == TOTAL and read_meta(workdir / token / str(last))["completed"]
        weights = summary[token]["objective_weights"]
        assert (weights["gamma"], weights["alpha"], weights["beta"], weights["feature"]) == (1.0, 0.0, beta, criterion)
        record = summary[token]["record"]
        assert record[f"phases.{token}.feature"] == criterion and record[f"phases.{token}.beta"] == beta
        assert rows[token][1:3] == ["student", f"kd+{criterion}"], rows[token]  # the printed summary table


def test_cktf_saves_one_bank_pair_per_crd(suite):
    """CKTF on ResNet-20: 5 CRDs (stem, 3 stages, embedding), each with its heads, banks and Z in the
    checkpoint; the banks moved and Z was set by the first step."""
    workdir, _ = suite
    aux = read_state(workdir / "cktf" / str(TOTAL))["aux"]
    pairs = [f"pair{i}" for i in range(5)]
    assert sorted(aux["params"]) == pairs and sorted(aux["state"]) == ["labels", *pairs]
    for pair in pairs:
        bank = aux["state"][pair]
        assert bank["memory_s"].shape == (1437, 128) and float(bank["z_s"]) > 0 and float(bank["z_t"]) > 0
        norms = np.linalg.norm(bank["memory_t"], axis=1)
        assert np.sum(np.abs(norms - 1) < 1e-4) >= TOTAL * 128  # rows written this epoch are unit vectors


def test_paraphraser_phase_trains_and_the_student_phase_freezes_it(suite):
    workdir, _ = suite
    records = read_metrics(workdir)
    para = [r for r in records if r["phase"] == "ft_paraphraser" and r["kind"] == "train"]
    assert [r["step"] for r in para] == list(range(1, TOTAL + 1))
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in para)
    trained = flat(read_state(workdir / "ft_paraphraser" / str(TOTAL))["params"])
    earlier = flat(read_state(workdir / "ft_paraphraser" / "9")["params"])
    final = flat(read_state(workdir / "ft" / str(TOTAL))["aux"]["state"]["paraphraser"])
    assert trained.keys() == final.keys()
    for key, value in trained.items():
        np.testing.assert_array_equal(final[key], value)  # loaded, then never updated
    assert any(not np.array_equal(v, earlier[k]) for k, v in trained.items())  # trained on
    ft = [r for r in records if r["phase"] == "ft" and r["kind"] == "train"]
    _, beta = recipes.FT_BASELINE
    assert len(ft) == TOTAL
    for r in ft:
        assert r["loss"] == pytest.approx(r["ce"] + beta * r["factor"], rel=1e-4)
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["ft"]["record"]["phases.ft.aux_from"] == "ft_paraphraser"
    assert summary["ft_paraphraser"]["record"]["phases.ft_paraphraser.kind"] == "paraphraser"


def test_fsp_init_trains_the_features_only_then_plain_ce(suite):
    workdir, _ = suite
    before = flat(read_state(workdir / "calibrate" / str(finalized_steps(workdir / "calibrate")[-1]))["params"])
    after = flat(read_state(workdir / "fsp_init" / str(TOTAL))["params"])
    assert before.keys() == after.keys()
    classifier = [k for k in before if k.startswith("['classifier']")]
    assert classifier
    for key in classifier:
        np.testing.assert_array_equal(after[key], before[key])
    assert any(not np.array_equal(after[k], before[k]) for k in before if k.startswith("['layer"))
    records = read_metrics(workdir)
    init = [r for r in records if r["phase"] == "fsp_init" and r["kind"] == "train"]
    assert len(init) == TOTAL
    for r in init:
        assert math.isfinite(r["fsp"]) and r["loss"] == pytest.approx(r["fsp"], rel=1e-5)
        assert "ce" not in r
    main = [r for r in records if r["phase"] == "fsp" and r["kind"] == "train"]
    assert len(main) == TOTAL and all("fsp" not in r for r in main)


# Interrupted at step 5 of each phase (checkpoints at 3 and, on the stop, 5): the steps each run
# trains before the stop request, counted from its start (the resumed phase's 6 remaining steps,
# then 5 of the next phase).
STOPS = (("crd", 5), ("cktf", TOTAL - 5 + 5), ("ft_paraphraser", TOTAL - 5 + 5))


def test_interrupted_phases_with_auxiliary_state_resume_to_identical_state(suite, tmp_path, monkeypatch, capsys):
    reference, _ = suite
    config = feature_suite_config()
    config.phase_order = ",".join(["teacher", "calibrate", *FEATURE_SUITE_INTERRUPTED])
    workdir = tmp_path / "work"
    for phase, steps in STOPS:
        with monkeypatch.context() as m:
            interrupt_after(m, steps)
            with pytest.raises(Interrupted) as info:
                loop.run(config, workdir, mesh=_mesh())
        assert (info.value.phase, info.value.step) == (phase, 5)
        assert finalized_steps(workdir / phase)[-1] == 5
        assert not read_meta(workdir / phase / "5")["completed"]
        if phase != "ft_paraphraser":
            assert "aux" in state_keys(workdir / phase / "5")  # the criterion's parts are saved
    capsys.readouterr()
    loop.run(config, workdir, mesh=_mesh())
    assert "[ft_paraphraser] resuming from step 5" in capsys.readouterr().out
    for phase in ("teacher", "calibrate", *FEATURE_SUITE_INTERRUPTED):
        last = finalized_steps(workdir / phase)[-1]
        assert last == finalized_steps(reference / phase)[-1]
        # Every array: params, BatchNorm statistics, Adam/SGD moments, step, rng, auxiliary parts.
        assert_trees_identical(read_state(workdir / phase / str(last)), read_state(reference / phase / str(last)))
        assert read_meta(workdir / phase / str(last)).get("eval") == read_meta(reference / phase / str(last)).get("eval")
