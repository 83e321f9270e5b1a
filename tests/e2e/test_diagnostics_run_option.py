"""quant.diagnostics_every_steps: the estimator diagnostics logged during a student phase.

Digits teacher (0 epochs) -> calibrate -> 11 SQAKD steps, diagnostics every 5 steps for 'ste' and
'dsq': metrics.jsonl holds 'diagnostics' records at steps 5 and 10 with every quantized layer's
gradient norms, cosines and clip fraction and each estimator's descent share; the training losses
are those of the same run without the option (watching only)."""

from __future__ import annotations

import math

from qkd_jax.run.loop import run
from tests.e2e.helpers import mesh, read_metrics, record_config


def _losses(workdir):
    return [r["loss"] for r in read_metrics(workdir) if r["phase"] == "sqakd" and r["kind"] == "train"]


def test_diagnostics_are_logged_and_change_nothing(tmp_path):
    plain = record_config()
    plain.log_every_steps = 1
    run(plain, tmp_path / "plain", mesh=mesh(1))
    watched = record_config()
    watched.log_every_steps = 1
    watched.quant.diagnostics_every_steps = 5
    watched.quant.diagnostics_estimators = "ste,dsq"
    run(watched, tmp_path / "watched", mesh=mesh(1))
    records = [r for r in read_metrics(tmp_path / "watched") if r["kind"] == "diagnostics"]
    assert [(r["phase"], r["step"]) for r in records] == [("sqakd", 5), ("sqakd", 10)]
    for r in records:
        layers = [k.split("/", 1)[1] for k in r if k.startswith("clip/")]
        assert len(layers) == 18  # ResNet-20's quantized convs under 'sqakd_cifar' (stem, classifier FP)
        for layer in layers:
            assert r[f"ste/grad_norm/{layer}"] > 0 and math.isfinite(r[f"dsq/grad_norm/{layer}"])
            assert -1.0 <= r[f"cos/ste|dsq/{layer}"] <= 1.0 and 0.0 <= r[f"clip/{layer}"] <= 1.0
            assert r[f"ste/act_grad_norm/{layer}"] > 0 and 0.0 <= r[f"act_clip/{layer}"] <= 1.0
        assert 0.0 <= r["ste/descent"] <= 1.0 and 0.0 <= r["dsq/descent"] <= 1.0
    assert _losses(tmp_path / "watched") == _losses(tmp_path / "plain")
