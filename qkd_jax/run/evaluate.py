"""Evaluation of a network's variables over the whole eval split (top-1, top-5, mean CE)."""

from __future__ import annotations

import functools

import jax

from qkd_jax.data.device_prefetch import DevicePrefetch
from qkd_jax.run.context import RunContext, console
from qkd_jax.run.loaders import check_batch, eval_batches, preprocess
from qkd_jax.train import parallel
from qkd_jax.train.step import eval_step


def compiled_eval_step(ctx: RunContext, model):
    """`model`'s eval step as `evaluate` runs it: jit(shard_map(eval_step)) over the run's mesh."""
    return parallel.compile_eval_step(
        functools.partial(eval_step, apply_fn=model.apply, preprocess=preprocess(ctx)), ctx.mesh)


def eval_inputs(batch: dict) -> dict:
    """The entries of an eval batch the eval step reads."""
    return {k: v for k, v in batch.items() if k in ("image", "label", "mask")}


def evaluate(ctx: RunContext, model, variables: dict, phase: str = "") -> dict:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole eval split (announced on
    the console for `phase`, since a large split takes a while)."""
    check_batch(ctx, ctx.config.dataset.eval_batch_size, "dataset.eval_batch_size")
    if phase:
        first = " (compiling the eval step)" if id(model) not in ctx.eval_steps else ""
        console(f"[{phase}] evaluating on the {ctx.info.eval_split} split{first} ...")
    if id(model) not in ctx.eval_steps:  # the model is kept in the value, so its id stays unique
        ctx.eval_steps[id(model)] = (model, compiled_eval_step(ctx, model))
    p_eval = ctx.eval_steps[id(model)][1]
    variables = parallel.replicate(variables, ctx.mesh)
    totals: dict[str, float] = {}

    def put(batch):
        return parallel.shard_batch(eval_inputs(batch), ctx.mesh)

    for batch in DevicePrefetch(iter(eval_batches(ctx)), put, ctx.config.data.prefetch):
        sums = jax.device_get(p_eval(variables, batch))
        for key, value in sums.items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.get("count", 0.0), 1.0)
    return {
        "top1": 100.0 * totals["top1"] / count,
        "top5": 100.0 * totals["top5"] / count,
        "loss": totals["loss"] / count,
        "count": int(totals["count"]),
    }
