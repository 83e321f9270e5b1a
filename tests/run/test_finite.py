"""The advice of a NaN/inf loss stop (qkd_jax/run/finite.py) for a phase that saved nothing: the
other branches (a diverged checkpoint, and that the advice works) are checked on a real run in
tests/e2e/test_run_outputs.py."""

from __future__ import annotations

import pytest
from etils import epath

from qkd_jax.run.finite import NonFiniteLossError, check_finite, checkpoint_advice


def test_a_phase_without_a_checkpoint_says_rerunning_starts_from_scratch(tmp_path):
    directory = epath.Path(tmp_path) / "work" / "teacher"
    message = checkpoint_advice("teacher", directory, [])
    assert message.startswith(f"Nothing of this phase was saved ({directory} holds no checkpoint), so rerunning "
                              f"unchanged starts it from scratch")
    assert "resumes" not in message
    assert "config.phases.teacher.weights.learning_rate" in message and "--config.retrain_from=teacher" in message
    assert f"{directory.parent / 'metrics.jsonl'}" in message


def test_check_finite_names_the_non_finite_values_and_reads_the_advice_only_then():
    calls = []

    def advice():
        calls.append(1)
        return "ADVICE"

    assert check_finite({"loss": 1.5, "kl": 0.25}, "p", 3, advice) == {"loss": 1.5, "kl": 0.25}
    assert calls == []
    with pytest.raises(NonFiniteLossError, match=r"^phase 'p': \{'loss': nan\} at step 7\. ADVICE$"):
        check_finite({"loss": float("nan"), "kl": 0.25}, "p", 7, advice)
    assert calls == [1]
