"""The `data` config section: validation, and config.json files written before it existed."""

from __future__ import annotations

import json

import ml_collections
import pytest

from qkd_jax.run.config_files import load_config
from qkd_jax.run.config_schema import ConfigError, base_config, validate


@pytest.mark.parametrize("key, value, why", [
    ("num_workers", -1, "must be an integer in"),
    ("prefetch", -2, "must be an integer in"),
    ("jpeg", "yes", "must be True or False"),
])
def test_bad_data_values_name_the_key(key, value, why):
    c = base_config()
    c.data = ml_collections.ConfigDict({**c.data.to_dict(), key: value})  # as read from JSON
    with pytest.raises(ConfigError, match=rf"config\.data\.{key}=.*{why}"):
        validate(c)


def test_old_config_json_gets_the_default_data_section(tmp_path):
    values = json.loads(base_config().to_json())
    del values["data"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    config = load_config(str(path))
    assert config.data.to_dict() == {"num_workers": 0, "prefetch": 2, "jpeg": False}
    validate(config)
