"""Every built-in gradient estimator trains the digits student with every quantizer method through
the CLI (issue 27's "done when"): one process per estimator (tests/e2e/estimator_cli.py) runs
teacher (0 epochs) -> calibrate -> 11 SQAKD steps for interval, LSQ, PACT and DoReFa at W2A2.

Each run must finish, record its estimator, and end with a finite loss and test accuracy; every
estimator other than the STE must change the training numbers (its last logged loss differs from
the STE run's for the same method), so a run that silently ignored its estimator fails.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys

import pytest

from tests.e2e.helpers import REPO, read_metrics, subprocess_env
from tests.e2e.estimator_cli import METHODS

# name -> estimator_options ('ewgs' with an explicit delta: without one it is the legacy STE default)
ESTIMATORS = {"ste": "", "ewgs": "delta=0.2", "dsq": "", "approxsign": "", "reste": "", "stochastic": "",
              "noise": "rate=0.5"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, pathlib.Path]:
    """One process per estimator, two at a time (the 2-core budget); ~50 s of CPU per method run."""
    root = tmp_path_factory.mktemp("estimators")

    def one(name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "tests.e2e.estimator_cli", name, ESTIMATORS[name],
                               str(root / name)], cwd=REPO, env=subprocess_env(1), capture_output=True,
                              text=True, timeout=1800)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(ESTIMATORS, pool.map(one, ESTIMATORS)))
    for name, proc in procs.items():
        assert proc.returncode == 0, f"{name}: {proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {name: root / name for name in ESTIMATORS}


def _last_loss(workdir: pathlib.Path) -> float:
    rows = [r for r in read_metrics(workdir) if r.get("phase") == "sqakd" and r.get("kind") == "train"]
    assert rows, f"no sqakd losses in {workdir}"
    return float(rows[-1]["loss"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimator_trains_every_method_through_the_cli(runs, name, method):
    workdir = runs[name] / method
    sqakd = json.loads((workdir / "summary.json").read_text())["sqakd"]
    assert sqakd["record"]["quant.estimator"] == name and sqakd["record"]["quant.method"] == method
    if ESTIMATORS[name]:
        assert sqakd["record"]["quant.estimator_options"] == ESTIMATORS[name]
    loss = _last_loss(workdir)
    assert math.isfinite(loss)
    assert 0.0 <= sqakd["eval"]["top1"] <= 100.0
    if name != "ste":
        assert loss != _last_loss(runs["ste"] / method), f"{name} trained the same numbers as the STE"
