"""A ConfigDict from what a command line names: a config file (`configs/X.py[:ARG]`) or a run's
config.json (which may lie in a bucket: `gs://bucket/run/config.json`)."""

from __future__ import annotations

import importlib.util
import json

import ml_collections

from qkd_jax.run.config_schema import base_config
from qkd_jax.train.paths import as_path


def load_config(spec: str) -> ml_collections.ConfigDict:
    """`get_config(ARG)` of a config .py file (`PATH[:ARG]`), or the ConfigDict of a config.json."""
    path, _, arg = spec.partition(":")
    file = as_path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config: no file {file}")
    if file.suffix == ".json":
        values = json.loads(file.read_text())
        # A config.json written before `data` existed ran with the defaults (host decode, no workers).
        values.setdefault("data", base_config().data.to_dict())
        # ... and before pluggable estimators: the legacy estimator, no diagnostics (docs/method.md section 12).
        defaults = base_config().quant
        for key in ("estimator_options", "diagnostics_every_steps", "diagnostics_estimators"):
            values.get("quant", {}).setdefault(key, defaults[key])
        return ml_collections.ConfigDict(values)
    # A config .py is imported by Python's import system: it must be a local file.
    module_spec = importlib.util.spec_from_file_location(f"_qkd_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
