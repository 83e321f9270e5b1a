"""Exporting a run's checkpoint: find the phase's checkpoint, rebuild its student from the
config stored with it, check that they match, and hand both to `quant.export.export_variables`.

The application-layer half of the integer export (it reads run directories and configs, which
`qkd_jax.quant` never does). Command line: `python -m qkd_jax.export` (`run/export_cli.py`).
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import traverse_util
from flax.core import unfreeze

from qkd_jax.quant.export.exporter import (
    ConfigMismatchError,
    ExportError,
    FullPrecisionModelError,
    export_variables,
)
from qkd_jax.quant.export.fileformat import IntegerExport
from qkd_jax.quant.layer_quant import QUANT
from qkd_jax.run import build
from qkd_jax.run.record import MANIFEST_KEYS, diff_records, format_change, shape_record
from qkd_jax.train.checkpoint import CorruptCheckpointError, PhaseCheckpointer, read_arrays
from qkd_jax.train.paths import PathLike, as_path


def _phase_dirs(workdir: epath.Path) -> list[str]:
    if not workdir.is_dir():
        return []
    return sorted(p.name for p in workdir.iterdir() if p.is_dir() and any(c.name.isdigit() for c in p.iterdir()))


def _unreadable(step_dir: epath.Path, err: Exception) -> CorruptCheckpointError:
    cause = (str(err).strip().splitlines() or [""])[0][:200]
    return CorruptCheckpointError(
        f"checkpoint {step_dir} cannot be read ({type(err).__name__}: {cause}); export another "
        f"step with --step=N, or rerun the run's command to rewrite it")


def _read_meta(ckpt: PhaseCheckpointer, step: int) -> dict:
    try:
        return ckpt.read_meta(step) or {}
    except Exception as err:  # orbax raises many types for damaged files
        raise _unreadable(ckpt.directory / str(step), err) from None


def _restore_arrays(step_dir: epath.Path) -> dict:
    """'params' and 'batch_stats' of a saved TrainState, as numpy (any device count)."""
    try:
        arrays = read_arrays(step_dir, ("params", "batch_stats"))
    except Exception as err:  # orbax/tensorstore raise many types for damaged files
        raise _unreadable(step_dir, err) from None
    if "params" not in arrays:
        raise ExportError(f"{step_dir / 'state'} holds no 'params'")
    return arrays


def _shape_diff(expected: Mapping[str, Any], found: Mapping[str, Any], limit: int = 10) -> list[str]:
    """Readable differences between two variables trees (shapes, and leaves only on one side)."""
    def flat(tree):
        return {"/".join((c, *k)): tuple(np.shape(v)) for c in ("params", "batch_stats")
                for k, v in traverse_util.flatten_dict(unfreeze(tree.get(c, {}))).items()}

    exp, got = flat(expected), flat(found)
    lines = [f"{k}: config {exp[k]}, checkpoint {got[k]}" for k in sorted(set(exp) & set(got)) if exp[k] != got[k]]
    lines += [f"{k}: in the config's model, not in the checkpoint" for k in sorted(set(exp) - set(got))]
    lines += [f"{k}: in the checkpoint, not in the config's model" for k in sorted(set(got) - set(exp))]
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _check_against_record(config: Any, record: Optional[dict], where: str) -> None:
    """Refuses a given config whose model-shaping or quantizer-training settings (MANIFEST_KEYS)
    differ from those the checkpoint recorded: equal shapes do not make W2A2 weights W4A4 ones,
    and the export's manifest would state an estimator / EWGS delta (or Hessian schedule) the
    student never trained with. A checkpoint written before records were kept has none to compare
    (the shape check below still runs)."""
    if not record:
        return
    try:
        now = shape_record(config, MANIFEST_KEYS)
    except Exception as err:  # a config that cannot even be resolved
        raise ConfigMismatchError(f"the config cannot be resolved: {type(err).__name__}: {err}") from None
    changes = diff_records(record, now, tuple(k for k in MANIFEST_KEYS if k in record))
    if changes:
        raise ConfigMismatchError(
            f"the config does not describe the checkpoint {where}, which recorded other settings:\n  "
            + "\n  ".join(format_change(*c) for c in changes)
            + "\nLeave out --config to export with the checkpoint's own config.")


def export_checkpoint(workdir: PathLike, phase: str, *, step: Optional[int] = None,
                      config: Any = None) -> IntegerExport:
    """Exports the student of `workdir/<phase>/` (default: its newest completed checkpoint).

    The model is rebuilt from the config stored in the checkpoint's metadata (or `config`, a
    ConfigDict, when given: it must agree with the checkpoint's record on the model, classes,
    image size, method, bits, preset, pact_alpha, variant, estimator, EWGS delta and Hessian
    schedule, record.MANIFEST_KEYS) with `qkd_jax.run.build.student_network`.

    Raises:
      ExportError (FileNotFoundError-like message) when the phase directory or a completed
        checkpoint is missing; FullPrecisionModelError for an FP checkpoint (the teacher);
      ConfigMismatchError when `config` differs from the checkpoint's record in a setting that
        shapes the model, or its model has other variables than the checkpoint.
    """
    workdir = as_path(workdir)  # local or a bucket URI
    directory = workdir / phase
    if not directory.is_dir():
        found = _phase_dirs(workdir)
        where = (f"; phases with checkpoints in {workdir}: {found}" if found
                 else f" ({workdir} holds no phase checkpoints)")
        raise ExportError(f"no phase directory {directory}{where}")
    ckpt = PhaseCheckpointer(directory, read_only=True)  # the run may still be writing it
    try:
        steps = ckpt.steps()
        if not steps:
            raise ExportError(f"{directory} holds no finished checkpoint")
        if step is None:
            completed = [s for s in reversed(steps) if _read_meta(ckpt, s).get("completed")]
            if not completed:
                raise ExportError(f"phase {phase!r} has not completed (checkpoints at steps {steps}); "
                                  f"pass step=N (--step=N) to export an unfinished one")
            step = completed[0]
        elif step not in steps:
            raise ExportError(f"{directory} has no checkpoint at step {step}; steps: {steps}")
        meta = _read_meta(ckpt, step)
    finally:
        ckpt.close()
    if meta.get("kind") == "teacher":
        raise FullPrecisionModelError(
            f"phase {phase!r} is a 'teacher' phase: its checkpoint is the full-precision model, with no "
            f"quantized layer to export. Export a student phase (calibrate / sqakd / qat ...).")
    if config is not None:
        _check_against_record(config, meta.get("record"), f"{directory}/{step}")
    else:
        text = meta.get("config")
        if not text and (workdir / "config.json").is_file():
            text = (workdir / "config.json").read_text()
        if not text:
            raise ExportError(f"checkpoint {directory}/{step} carries no config and {workdir}/config.json is missing")
        config = ml_collections.ConfigDict(json.loads(text))
    variables = _restore_arrays(directory / str(step))
    if not any(QUANT in k for k in traverse_util.flatten_dict(unfreeze(variables["params"]))):
        raise FullPrecisionModelError(
            f"checkpoint {directory}/{step} holds no quantizer parameters: it is a full-precision model")
    try:
        model = build.student_network(config, jnp.float32).local_model
        input_shape = build.input_shape(config)
        expected = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, *input_shape), jnp.float32), train=False),
                                  jax.random.key(0))
    except Exception as err:  # a config that cannot even build its model
        raise ConfigMismatchError(f"the config cannot build the student model: {type(err).__name__}: {err}") from None
    diff = _shape_diff(expected, variables)
    if diff:
        raise ConfigMismatchError(
            f"the config ({config.model.name}, {config.quant.method} W{config.quant.w_bits}A{config.quant.a_bits}, "
            f"preset {config.quant.preset}) does not describe the checkpoint {directory}/{step}:\n  "
            + "\n  ".join(diff))
    source = {"workdir": str(workdir), "phase": phase, "step": int(step), "kind": meta.get("kind"),
              "eval": meta.get("eval", {})}
    return export_variables(model, variables, input_shape, config_json=config.to_json(), source=source)


def load_model(exported: IntegerExport) -> nn.Module:
    """The flax student model of an export, rebuilt from the config stored in its manifest."""
    text = exported.manifest.get("config")
    if not text:
        raise ExportError("this export carries no config: pass the flax model explicitly")
    return build.student_network(ml_collections.ConfigDict(json.loads(text)), jnp.float32).local_model
