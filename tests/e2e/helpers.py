"""Small configs and checkpoint readers for the end-to-end tests.

The file doubles as a config file for the CLI (ml_collections `get_config(arg)`), so a subprocess
runs exactly the config a test builds in-process:

    python -m qkd_jax.main --config=tests/e2e/helpers.py:resume --workdir=DIR

Only `qkd_jax.run.config_schema` is imported at module level (the CLI loads this file before
the runner); JAX, numpy and orbax are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Optional

from qkd_jax.run.config_schema import base_config, optimizer_config, phase

REPO = pathlib.Path(__file__).resolve().parents[2]
HELPERS = "tests/e2e/helpers.py"  # relative to REPO (the subprocesses' working directory)


# ----------------------------------------------------------------------------- configs


def _set_phases(config, phases: list[tuple[str, Any]]) -> None:
    """`phase_order` and `phases` from (name, phase) pairs; each phase deep-copied (no shared nodes)."""
    from qkd_jax.run import recipes

    recipes.set_phases(config, phases)


def teacher_only(*, epochs: int = 1, batch_size: int = 64, lr: float = 0.05, **top: Any):
    """Digits, FP ResNet-20, one short teacher phase (SGD, constant rate)."""
    c = base_config()
    c.dataset.name = "qkd_digits"
    c.dataset.eval_batch_size = 360  # the whole test split in one batch (360 = 8 * 45)
    c.model.name = "resnet20"
    c.tensorboard = False
    c.log_every_steps = 1
    c.checkpoint_every_steps = 4
    weights = optimizer_config(optimizer="sgd", learning_rate=lr, momentum=0.9, schedule="constant")
    _set_phases(c, [("teacher", phase("teacher", epochs=epochs, batch_size=batch_size, weights=weights))])
    for key, value in top.items():
        c[key] = value
    return c


def sqakd_chain(config, *, epochs: int = 1, batch_size: int = 16) -> None:
    """Appends calibrate -> sqakd (KL to the frozen teacher, no labels) to a teacher-only config."""
    phases = [(n, config.phases[n]) for n in config.phase_order.split(",")]
    phases += [
        ("calibrate", phase("calibrate", init_from="teacher", batch_size=batch_size)),
        ("sqakd", phase("student", objective="sqakd", init_from="calibrate", teacher_from="teacher",
                        epochs=epochs, batch_size=batch_size)),
    ]
    _set_phases(config, phases)


def qkd_chain(config, *, epochs: int = 1, batch_size: int = 16) -> None:
    """Appends the QKD phases self_study -> co_study (trained teacher) -> tutoring (after calibrate)."""
    phases = [(n, config.phases[n]) for n in config.phase_order.split(",")]
    phases += [
        ("self_study", phase("student", objective="self_study", init_from="calibrate", epochs=epochs,
                             batch_size=batch_size, temperature=2.0)),
        ("co_study", phase("student", objective="co_study", init_from="self_study", teacher_from="teacher",
                           train_teacher=True, epochs=epochs, batch_size=batch_size, temperature=2.0)),
        ("tutoring", phase("student", objective="tutoring", init_from="co_study", teacher_from="co_study",
                           epochs=epochs, batch_size=batch_size, temperature=2.0)),
    ]
    _set_phases(config, phases)


def resume_config():
    """Digits teacher -> calibrate -> sqakd (1 epoch of 22 steps, batch 64), a checkpoint every
    3 steps, so a run can be killed in the middle of the sqakd phase. The teacher trains for 0
    epochs (initialised, evaluated and saved): what matters is that its checkpoint is what the
    resumed student reads back as its frozen teacher."""
    c = teacher_only(epochs=0, batch_size=64, checkpoint_every_steps=3, log_every_steps=11)
    sqakd_chain(c, epochs=1, batch_size=64)
    c.phases.sqakd.weights = optimizer_config(optimizer="adam", learning_rate=1e-3, schedule="cosine_epoch")
    return c


def record_config():
    """Digits teacher (0 epochs) -> calibrate -> sqakd (1 epoch of 11 steps, batch 128), a
    checkpoint every 5 steps (steps 10 and 11 kept): a finished run that takes seconds, for
    the tests of reruns with changed settings."""
    c = teacher_only(epochs=0, batch_size=128, checkpoint_every_steps=5, log_every_steps=11)
    sqakd_chain(c, epochs=1, batch_size=128)
    return c


def safety_config():
    """Digits FP teacher only, 1 epoch of 22 steps (batch 64), a checkpoint every 3 steps: a
    short run to stop with signals and to hold the workdir's lock."""
    return teacher_only(epochs=1, batch_size=64, checkpoint_every_steps=3, log_every_steps=1)


# Digits-sized options: CRD / CKTF negatives (released 16384 / 4096), CKTF's pooling of 4x4 maps.
FEATURE_TEST_OPTIONS = {"crd": {"nce_k": 1024}, "cktf": {"nce_k": 1024, "pool": "global"}}


# The feature suite's phases after teacher (0 epochs) and calibrate: first the ones with
# auxiliary state that tests interrupt and resume (their seeds depend on their position only),
# then the other one-phase baselines, FT's student phase and FSP's two phases.
FEATURE_SUITE_INTERRUPTED = ("crd", "cktf", "ft_paraphraser")
FEATURE_SUITE_BASELINES = ("crd", "cktf", "at", "nst", "sp", "rkd", "fitnet", "cc", "vid")


def feature_suite_config():
    """Digits teacher (0 epochs) -> calibrate -> every feature-distillation method, each 1 epoch of
    11 steps (batch 128) from the calibration, a checkpoint every 3 steps: crd, cktf,
    ft_paraphraser (FT's paraphraser), at, nst, sp, rkd, fitnet, cc, vid, ft (feature='factor'),
    fsp_init (FSP losses alone, classifier frozen), fsp (plain CE from fsp_init)."""
    from qkd_jax.run import recipes

    c = teacher_only(epochs=0, batch_size=128, checkpoint_every_steps=3, log_every_steps=1)
    # Shared by every phase below: set_phases deep-copies each phase, so none shares a node.
    weights = optimizer_config(optimizer="adam", learning_rate=1e-3, schedule="cosine_epoch")
    quant = optimizer_config(optimizer="adam", learning_rate=1e-5, schedule="cosine_epoch")

    def baseline(token):
        return (token, recipes.feature_phase(token, epochs=1, batch_size=128, weights=weights,
                                             quant_params=quant,
                                             options=FEATURE_TEST_OPTIONS.get(token)))

    # FSP's init as the digits config runs it (configs/digits_feature_kd.py): the released init SGD
    # for the weights at the student's rate, the quantizer parameters on the student's Adam.
    fsp_init = recipes.fsp_init_phase(epochs=1, batch_size=128, learning_rate=1e-3)
    fsp_init.quant_params = quant
    phases = [("teacher", c.phases.teacher), ("calibrate", phase("calibrate", init_from="teacher", batch_size=128)),
              baseline("crd"), baseline("cktf"), ("ft_paraphraser", recipes.paraphraser_phase(epochs=1, batch_size=128))]
    phases += [baseline(token) for token in FEATURE_SUITE_BASELINES[2:]]
    phases += [
        ("ft", recipes.ft_phase(paraphraser="ft_paraphraser", epochs=1, batch_size=128,
                                weights=weights,
                                quant_params=quant)),
        ("fsp_init", fsp_init),
        ("fsp", phase("student", objective="task", init_from="fsp_init", epochs=1, batch_size=128,
                      weights=weights, quant_params=quant)),
    ]
    _set_phases(c, phases)
    return c


def interrupt_after(monkeypatch, steps: int) -> None:
    """From now on, the runner's training loops (train_phase, paraphraser_phase) see a SIGTERM
    request after `steps` more training steps of this process: the phase saves a checkpoint at
    that step boundary and raises `Interrupted`, exactly as on a real signal (run/interrupt.py;
    the real-signal path is tested in test_run_safety.py)."""
    import signal

    from qkd_jax.run import paraphraser_phase, train_phase

    calls, requested = [0], []

    def stop_requested():
        if not requested:
            calls[0] += 1
            if calls[0] >= steps:
                requested.append(int(signal.SIGTERM))
        return requested[0] if requested else None

    for module in (train_phase, paraphraser_phase):
        monkeypatch.setattr(module, "stop_requested", stop_requested)


def get_config(arg: str = "teacher"):
    """CLI entry: 'teacher' (teacher_only), 'resume' (resume_config), 'record' (record_config) or
    'safety' (safety_config)."""
    configs = {"teacher": teacher_only, "resume": resume_config, "record": record_config,
               "safety": safety_config}
    if arg not in configs:
        raise ValueError(f"unknown helpers config {arg!r}; use one of {sorted(configs)}")
    return configs[arg]()


# ----------------------------------------------------------------------------- in-process runs


def mesh(devices: int = 2):
    """A mesh over the first `devices` of the pytest process's 8 CPU devices, for `loop.run`.

    Two devices still run the sharded step with cross-device means; a checkpoint save or restore
    of replicated arrays costs about a quarter of the 8-device time. Tests where the device count
    is the point build their own mesh."""
    import jax

    from qkd_jax.train import parallel

    return parallel.make_mesh(jax.devices()[:devices])


# ----------------------------------------------------------------------------- checkpoints on disk


def finalized_steps(phase_dir: str | os.PathLike) -> list[int]:
    """Steps of the finalised orbax checkpoints in a phase directory (tmp dirs excluded), sorted."""
    phase_dir = pathlib.Path(phase_dir)
    if not phase_dir.is_dir():
        return []
    return sorted(int(d.name) for d in phase_dir.iterdir()
                  if d.is_dir() and d.name.isdigit() and (d / "_CHECKPOINT_METADATA").exists())


def read_state(step_dir: str | os.PathLike) -> dict:
    """The raw arrays of a step's 'state' item as numpy (no template needed)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    from qkd_jax.train.checkpoint import metadata_tree

    path = pathlib.Path(step_dir).absolute() / "state"
    with ocp.PyTreeCheckpointer() as ckptr:
        # Restored as numpy on the host: no device placement (fast with 8 devices in the process).
        structure = metadata_tree(ckptr, path)
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), structure)
        return ckptr.restore(path, restore_args=args)


def state_keys(step_dir: str | os.PathLike) -> list[str]:
    """Top-level keys of a step's 'state' item, from its metadata only (no arrays read)."""
    import orbax.checkpoint as ocp

    from qkd_jax.train.checkpoint import metadata_tree

    with ocp.PyTreeCheckpointer() as ckptr:
        return sorted(metadata_tree(ckptr, pathlib.Path(step_dir).absolute() / "state"))


def read_meta(step_dir: str | os.PathLike) -> dict:
    """The 'meta' JSON item of a step (phase, step, completed, eval, ...)."""
    return json.loads((pathlib.Path(step_dir) / "meta" / "metadata").read_text())


def flat(tree: Any) -> dict[str, Any]:
    import jax
    import numpy as np

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_trees_identical(a: Any, b: Any) -> None:
    """Same leaves at the same paths, bit for bit."""
    import numpy as np

    fa, fb = flat(a), flat(b)
    assert sorted(fa) == sorted(fb), sorted(set(fa) ^ set(fb))
    for key in fa:
        assert fa[key].dtype == fb[key].dtype, key
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- subprocesses


def subprocess_env(devices: int = 1) -> dict[str, str]:
    """Environment for a CLI subprocess: CPU, a fixed device count, the tests' compilation cache.

    The pytest process's XLA_FLAGS (8 devices, from conftest) are replaced, not inherited.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_COMPILATION_CACHE_DIR"] = str(REPO / ".cache" / "jax")
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("QKD_DISTRIBUTED", None)
    return env


def cli_command(config_arg: str, workdir: str | os.PathLike, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "qkd_jax.main", f"--config={HELPERS}:{config_arg}",
            f"--workdir={workdir}", *overrides]


def run_cli(config_arg: str, workdir: str | os.PathLike, *overrides: str, timeout: float = 300,
            devices: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """Runs the CLI to completion; with `check`, a failure shows its output."""
    proc = subprocess.run(cli_command(config_arg, workdir, *overrides), cwd=REPO, env=subprocess_env(devices),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"CLI failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def tail(path: Optional[pathlib.Path], n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path and path.exists() else ""
