"""The run: validate the config, then run its phases in order and print a summary."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Optional

import jax
import ml_collections

from qkd_jax import data as qdata
from qkd_jax.models import list_models
from qkd_jax.train import build, parallel
from qkd_jax.train.config_schema import build_objective, phase_names, validate
from qkd_jax.train.metrics import MetricsWriter, format_duration
from qkd_jax.train.phases import PhaseResult, RunContext, run_phase


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Full validation against the known models, datasets, methods and presets."""
    validate(
        config,
        known_models=list_models(),
        known_datasets=qdata.DATASETS,
        known_methods=build.METHODS,
        known_presets=build.PRESETS,
    )


def open_datasets(config: ml_collections.ConfigDict) -> dict:
    """Opens the train and eval splits now, so a missing dataset stops the run before any work
    (DatasetNotPreparedError says how to prepare it). Returns {split: source} for the run."""
    info = qdata.dataset_info(config.dataset.name)
    return {split: qdata.get_source(config.dataset.name, split, config.dataset.data_dir or None)
            for split in (info.train_split, info.eval_split)}


def summary_table(config: ml_collections.ConfigDict, results: dict[str, PhaseResult]) -> str:
    """One row per phase: kind, objective, precision, top-1/top-5."""
    q = config.quant
    rows = [("phase", "kind", "objective", "precision", "labels", "top1 %", "top5 %")]
    for name, res in results.items():
        ph = config.phases[name]
        precision = "FP32" if res.kind == "teacher" else f"{q.method} W{q.w_bits}A{q.a_bits}"
        objective = "-" if res.kind == "calibrate" else ph.objective
        uses_labels = "-"
        if res.kind != "calibrate":
            uses_labels = "yes" if build_objective(ph).needs_labels else "no"
        top1 = res.eval.get("top1")
        top5 = res.eval.get("top5")
        rows.append((name, res.kind, objective, precision, uses_labels,
                     f"{top1:.2f}" if top1 is not None else "-", f"{top5:.2f}" if top5 is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        mesh: Optional[jax.sharding.Mesh] = None) -> dict[str, PhaseResult]:
    """Runs every phase of `config` in `workdir`; finished phases are read back, not rerun."""
    validate_config(config)
    sources = open_datasets(config)
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = mesh or parallel.make_mesh()
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    writer = MetricsWriter(workdir, tensorboard=config.tensorboard)
    ctx = RunContext(config=config, workdir=workdir, mesh=mesh, writer=writer, sources=sources)
    t0 = time.perf_counter()
    try:
        for name in phase_names(config):
            run_phase(ctx, name)
    finally:
        writer.close()
    if jax.process_index() == 0:
        table = summary_table(config, ctx.results)
        print(f"\nSummary ({config.dataset.name}, {config.model.name}; wall time "
              f"{format_duration(time.perf_counter() - t0)}):\n{table}", flush=True)
        (workdir / "summary.json").write_text(json.dumps(
            {name: {"kind": r.kind, "eval": r.eval} for name, r in ctx.results.items()}, indent=2))
    return ctx.results
