"""No two phases of any config share a mutable node: an override of one phase never changes another.

Builds every config file under configs/ with every ARG its VARIANTS (or, for the digits
feature-KD file, its TOKENS) lists, and walks each phase's ConfigDict: a ConfigDict, dict or list
reachable from two phases (by identity) would make `--config.phases.A.x=...` train phase B with it.
No training: only configs are built.
"""

from __future__ import annotations

import pathlib

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from qkd_jax.run.config_schema import optimizer_config, phase, phase_names
from tests.configs.test_configs import CONFIG_DIR, CONFIG_FILES, get, module

pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

MUTABLE = (ml_collections.ConfigDict, dict, list)


def _args(name: str) -> list[str]:
    """'' (the file's default) and every ARG the file lists: VARIANTS, or each of its TOKENS and all of them."""
    m = module(name)
    if hasattr(m, "VARIANTS"):
        return ["", *m.VARIANTS]
    if hasattr(m, "TOKENS"):
        return ["", *m.TOKENS, ",".join(m.TOKENS)]
    return [""]


CASES = [(name, arg) for name in CONFIG_FILES for arg in _args(name)]


def _mutable_ids(node, path: str, out: dict[int, str]) -> None:
    """Every mutable node below `node` (itself included), by identity -> its path."""
    if not isinstance(node, MUTABLE):
        return
    out[id(node)] = path
    items = node.items() if isinstance(node, (ml_collections.ConfigDict, dict)) else enumerate(node)
    for key, value in items:
        _mutable_ids(value, f"{path}.{key}", out)


def shared_nodes(config: ml_collections.ConfigDict) -> list[str]:
    """'phases.A.x is phases.B.y' for every mutable node two phases (or one phase twice) reach."""
    seen: dict[int, str] = {}
    shared = []
    for name in config.phases.keys():
        found: dict[int, str] = {}
        _mutable_ids(config.phases[name], f"phases.{name}", found)
        for node, path in found.items():
            if node in seen:
                shared.append(f"{path} is {seen[node]}")
            seen[node] = path
    return shared


def test_the_walk_finds_a_shared_node():
    """The check itself: a ConfigDict handed to two phases is reported (the detector is not blind)."""
    weights = optimizer_config()
    config = ml_collections.ConfigDict({"phases": {"a": phase(), "b": phase()}})
    config.phases.b.weights = config.phases.a.weights = weights
    assert shared_nodes(config) == ["phases.b.weights is phases.a.weights"]


def test_phase_copies_the_config_dicts_it_is_given():
    weights = optimizer_config(learning_rate=0.1)
    a, b = phase(weights=weights), phase(weights=weights)
    a.weights.learning_rate = 1e6
    assert b.weights.learning_rate == 0.1 and weights.learning_rate == 0.1


@pytest.mark.parametrize("name,arg", CASES)
def test_no_two_phases_share_a_mutable_node(name, arg):
    config = get(name, arg)
    assert len(phase_names(config)) >= 1
    assert shared_nodes(config) == []


def _parse(*args: str) -> ml_collections.ConfigDict:
    argv = ["prog", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_demo_override_of_one_phase_leaves_the_other():
    """The reported case: the digits demo's sqakd and qat phases were built from one optimizer ConfigDict."""
    config = _parse(f"--config={pathlib.Path(CONFIG_DIR) / 'digits_demo.py'}",
                    "--config.phases.sqakd.weights.learning_rate=1e6",
                    "--config.phases.qat.quant_params.learning_rate=0.5")
    assert config.phases.sqakd.weights.learning_rate == 1e6
    assert config.phases.qat.weights.learning_rate == 1e-3
    assert config.phases.qat.quant_params.learning_rate == 0.5
    assert config.phases.sqakd.quant_params.learning_rate == 1e-4
