"""One process, one gradient estimator, the digits student of every quantizer method through the CLI.

    python -m tests.e2e.estimator_cli ESTIMATOR OPTIONS ROOT

For each method (interval, lsq, pact, dorefa) the command line `--config=tests/e2e/helpers.py:record
--config.quant.method=M --config.quant.estimator=ESTIMATOR --config.quant.estimator_options=OPTIONS`
is parsed as `python -m qkd_jax.main` parses it and run by the CLI's runner in ROOT/M (teacher of 0
epochs, calibrate, 11 SQAKD steps). One process for the four runs spares three JAX start-ups.
"""

from __future__ import annotations

import sys

from absl import flags
from ml_collections import config_flags

METHODS = ("interval", "lsq", "pact", "dorefa")


def parse(argv: list[str]):
    """The config of `python -m qkd_jax.main ARGV` (locked, overrides applied)."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True,
                                    sys_argv=argv)
    fv(argv)
    return fv.config


def main(estimator: str, options: str, root: str) -> None:
    from qkd_jax.run.cli_errors import run_reporting
    from qkd_jax.run.loop import run

    for method in METHODS:
        config = parse(["qkd_jax", "--config=tests/e2e/helpers.py:record", f"--config.quant.method={method}",
                        f"--config.quant.estimator={estimator}", f"--config.quant.estimator_options={options}"])
        run_reporting("qkd_jax", lambda: run(config, f"{root}/{method}"))


if __name__ == "__main__":
    main(*sys.argv[1:4])
