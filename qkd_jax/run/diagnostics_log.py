"""The estimator diagnostics as a run option: logged to metrics.jsonl / TensorBoard every N steps.

    --config.quant.diagnostics_every_steps=50 --config.quant.diagnostics_estimators=ste,dsq,reste

Every `diagnostics_every_steps` steps of a student phase (0: never), `qkd_jax.quant.diagnostics` runs
on one fresh training batch of the phase's batch size (labels read, host-normalised, not the step's
batch) with the current student, and writes one 'diagnostics' record: per estimator `NAME/descent`,
per estimator and layer `NAME/grad_norm/LAYER` (kernel) and `NAME/act_grad_norm/LAYER` (input), per
pair and layer `cos/A|B/LAYER`, per layer `clip/LAYER` (kernel) and `act_clip/LAYER` (input).
Watching only: the training numbers do not change and the settings are not part of
the phase record (docs/method.md section 12).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qkd_jax.models.registry import get_model
from qkd_jax.quant import estimators
from qkd_jax.quant.diagnostics import estimator_diagnostics, with_estimator
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.run import build


def diagnostics_names(text: str) -> list[str]:
    """'ste, dsq' -> ['ste', 'dsq']; raises ValueError naming an unregistered estimator."""
    names = list(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    unknown = [n for n in names if n not in estimators.ESTIMATORS]
    if unknown or not names:
        raise ValueError(f"names {unknown or 'no estimator'}; registered: {sorted(estimators.ESTIMATORS)}")
    return names


def due(config: Any, kind: str, done: int) -> bool:
    every = int(config.quant.get("diagnostics_every_steps", 0))
    return kind == "student" and every > 0 and done % every == 0


def flatten(report: dict) -> dict[str, float]:
    """The report's scalars under flat keys (metrics.jsonl, TensorBoard)."""
    out: dict[str, float] = {"hard_loss": report["loss"]}
    for name, share in report["descent"].items():
        out[f"{name}/descent"] = share
    for name, norms in report["grad_norm"].items():
        out.update({f"{name}/grad_norm/{layer}": v for layer, v in norms.items()})
    for layer, pairs in report["cosine"].items():
        out.update({f"cos/{pair}/{layer}": v for pair, v in pairs.items()})
    for name, norms in report["act_grad_norm"].items():
        out.update({f"{name}/act_grad_norm/{layer}": v for layer, v in norms.items()})
    out.update({f"clip/{layer}": v for layer, v in report["clip_fraction"].items()})
    out.update({f"act_clip/{layer}": v for layer, v in report["act_clip_fraction"].items()})
    return out


def log_diagnostics(ctx: Any, plan: Any, state: Any, done: int) -> dict[str, float]:
    """Computes the diagnostics of the current student and writes them at step `done`."""
    from qkd_jax.run.loaders import train_loader

    config = ctx.config
    rules = build.student_rules(config)
    ests = {n: estimators.make(n) for n in diagnostics_names(config.quant.diagnostics_estimators)}
    loader = train_loader(ctx, plan.batch_size, None, plan.seed + 104729 + done, labels=True,
                          sharded=False, workers=False)
    batch = next(iter(loader))
    variables = jax.device_get(state.variables())

    def model_for(est):
        conv, dense = quantized_layers(with_estimator(rules, est) if est is not None else rules)
        return get_model(config.model.name, build.num_classes(config), conv=conv, dense=dense,
                         dtype=build.compute_dtype(config))

    report = estimator_diagnostics(model_for, rules, variables, jnp.asarray(batch["image"]),
                                   jnp.asarray(batch["label"]), ests)
    values = flatten(report)
    ctx.writer.write(plan.name, done, "diagnostics", values)
    return values
