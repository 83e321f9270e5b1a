"""The application layer: the only package that reads a ConfigDict or a run directory.

    config_schema  defaults, overrides and validation of a run's config
    recipes        the papers' recipes the config files build on
    build          networks, precision rules and variables from a config
    plan           each phase resolved once into a PhasePlan
    context        what phases share (config, workdir, mesh, sources, networks, results)
    loaders        the run's data loaders; evaluate: the eval split
    states         a phase's TrainState, checkpoint metadata and result
    calibrate_phase, train_phase   the two kinds of phase; finite: NaN/inf stops (with advice);
                   divergence: the warning for a finite loss that explodes
    loop           run(config, workdir): all phases in order, the summary
    cli, demo, export_cli          command lines (python -m qkd_jax.main / .demo / .export)
    flag_parsing, cli_errors       what main and demo share: flags and --help, one-line errors
    fresh          demo --fresh: delete a workdir (under its lock) only when it is a qkd_jax run's
    export_checkpoint              a run's checkpoint -> integer export

Everything below it (`quant`, `models`, `distill`, `data`, `train`) is a library of pure
functions and modules that never reads a config. See docs/architecture.md.
"""
