"""A phase's record: the resolved settings that determine what the phase trains, as a flat
{config key: value} dict stored in its checkpoint metadata, and the differences between two.

What only changes how a run is watched or stored (log and checkpoint cadence, eval batch size,
TensorBoard, keep_checkpoints, data_dir) is left out, so changing it never blocks a rerun.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import ml_collections

from qkd_jax.run import build
from qkd_jax.run.config_schema import feature_options, objective_kwargs, phase_names
from qkd_jax.run.plan import PhasePlan

# The settings that shape the student's variables: an export refuses a config that differs here.
SHAPE_KEYS = ("model.name", "model.num_classes", "dataset.image_size", "quant.method", "quant.w_bits",
              "quant.a_bits", "quant.preset", "quant.pact_alpha", "quant.variant")
# What an export's manifest states about how the student was trained: an export refuses a config
# that differs here from the checkpoint's record (the manifest would name settings never used).
MANIFEST_KEYS = SHAPE_KEYS + ("quant.estimator", "quant.delta", "quant.hessian_every_epochs", "quant.hessian_batches",
                              "quant.hessian_batch_size", "quant.hessian_max_probes", "quant.hessian_probe",
                              "quant.hessian_loss")
# What a teacher read from another run's directory (config.teacher_checkpoint) must agree on.
TEACHER_SHAPE_KEYS = ("dataset.name", "model.name", "model.num_classes", "dataset.image_size")
_QUANT_KEYS = ("method", "variant", "w_bits", "a_bits", "preset", "estimator", "delta", "pact_alpha",
               "hessian_every_epochs", "hessian_batches", "hessian_batch_size", "hessian_max_probes")
MISSING = "<not recorded>"


def _json_values(record: dict) -> dict:
    """The record as it reads back from JSON metadata (tuples become lists), so an unchanged
    setting compares equal to its recorded value."""
    return json.loads(json.dumps(record))


def model_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Model and data settings, resolved (num_classes and image size 0 mean the dataset's own)."""
    return {
        "dataset.name": config.dataset.name,
        "dataset.image_size": build.input_shape(config)[0],
        "dataset.augment": config.dataset.augment,
        "model.name": config.model.name,
        "model.num_classes": build.num_classes(config),
    }


def quant_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    record = {f"quant.{key}": config.quant[key] for key in _QUANT_KEYS}
    # Recorded only when set, so workdirs written before the key existed still rerun; a rerun with
    # other options (or another estimator, quant.estimator) is a recorded change.
    if config.quant.get("estimator_options", ""):
        record["quant.estimator_options"] = config.quant.estimator_options
    return record


def shape_record(config: ml_collections.ConfigDict, keys: tuple[str, ...] = SHAPE_KEYS) -> dict[str, Any]:
    """The settings in `keys` (default SHAPE_KEYS: what a student's exported variables depend on;
    MANIFEST_KEYS adds how it was trained, what an export's manifest states)."""
    full = _json_values({**model_record(config), **quant_record(config),
                         "quant.hessian_probe": config.quant.hessian_probe,
                         "quant.hessian_loss": config.quant.hessian_loss})
    return {key: full[key] for key in keys}


def _group(prefix: str, group: ml_collections.ConfigDict) -> dict[str, Any]:
    return {f"{prefix}.{key}": value for key, value in group.items()}


def phase_record(config: ml_collections.ConfigDict, plan: PhasePlan) -> dict[str, Any]:
    """Everything that determines phase `plan.name`'s result, keyed by config key."""
    ph, key = config.phases[plan.name], f"phases.{plan.name}"
    # The phase's seed comes from the run seed and the phase's position in phase_order.
    position = phase_names(config).index(plan.name)
    record: dict[str, Any] = {"seed": config.seed, f"{key}.position_in_phase_order": position,
                              **model_record(config)}
    # Recorded only when not the default, so that workdirs written before the key existed
    # (float32 by definition) still rerun; a float32 record vs bfloat16 now is still a change.
    if config.get("compute_dtype", "float32") != "float32":
        record["compute_dtype"] = config.compute_dtype
    # Which teacher epoch the phases read (config.teacher_select): the teacher phase keeps another
    # checkpoint and every later phase starts from another network. Recorded only when not the
    # default, so workdirs written before the key existed ('last' by definition) still rerun.
    if config.get("teacher_select", "last") != "last":
        record["teacher_select"] = config.teacher_select
    if plan.kind != "calibrate" and config.get("data", {}).get("jpeg", False):
        record["data.jpeg"] = True  # the JPEG path's pixels differ slightly (docs/method.md section 10)
    record.update({f"{key}.kind": plan.kind, f"{key}.batch_size": plan.batch_size})
    record.update(_group(f"{key}.weights", ph.weights))
    record.update(_group(f"{key}.quant_params", ph.quant_params))
    if plan.kind != "teacher":
        record.update(quant_record(config))
        record.update({"teacher_checkpoint": config.teacher_checkpoint, f"{key}.init_from": plan.init_from})
    if plan.kind != "calibrate":
        record.update({f"{key}.objective": plan.objective_name, f"{key}.epochs": plan.epochs})
        record.update({f"{key}.{k}": v for k, v in objective_kwargs(ph.objective, ph).items()})
        if ph.feature:
            record[f"{key}.feature_options"] = feature_options(ph)
    if plan.hessian is not None:  # how the EWGS delta is refreshed (docs/method.md section 5)
        record.update({"quant.hessian_probe": config.quant.hessian_probe,
                       "quant.hessian_loss": config.quant.hessian_loss})
    if plan.kind == "paraphraser":
        record[f"{key}.teacher_from"] = plan.teacher_from
    if plan.aux_from:
        record[f"{key}.aux_from"] = plan.aux_from
    if plan.freeze:
        record[f"{key}.freeze"] = ",".join(plan.freeze)
    if plan.kind == "student":
        record.update({f"{key}.teacher_from": plan.teacher_from, f"{key}.train_teacher": plan.train_teacher})
        if plan.train_teacher:
            record.update(_group(f"{key}.teacher_opt", ph.teacher_opt))
    return _json_values(record)


def phase_settings(config: ml_collections.ConfigDict, plan: PhasePlan) -> dict[str, Any]:
    """A phase's entry in summary.json besides its results: precision, objective and its
    weights, epochs, batch size, and the full settings record (`phase_record`)."""
    q = config.quant
    precision = ({"method": "fp32", "w_bits": None, "a_bits": None, "preset": None}
                 if plan.kind in ("teacher", "paraphraser")
                 else {"method": q.method, "w_bits": q.w_bits, "a_bits": q.a_bits, "preset": q.preset})
    training = plan.kind != "calibrate"
    ph = config.phases[plan.name]
    return _json_values({
        "precision": precision,
        "objective": plan.objective_name if training else None,
        "objective_weights": objective_kwargs(ph.objective, ph) if training else {},
        "epochs": plan.epochs if training else 0,
        "batch_size": plan.batch_size,
        "record": phase_record(config, plan),
    })


def diff_records(recorded: Mapping[str, Any], now: Mapping[str, Any],
                 keys: Optional[tuple[str, ...]] = None) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, current value) for every key whose values differ (MISSING on the
    side that lacks it); only `keys` when given."""
    names = keys if keys is not None else sorted(set(recorded) | set(now))
    return [(k, recorded.get(k, MISSING), now.get(k, MISSING)) for k in names
            if recorded.get(k, MISSING) != now.get(k, MISSING)]


def format_change(key: str, recorded: Any, now: Any) -> str:
    return f"{key}: recorded {recorded!r}, now {now!r}"
