"""One-host accelerator benchmark of the compiled train steps, fp32 and bf16 (not a test).

    bash benchmarks/accelerator.sh                       # ResNet-18 + MobileNetV2, 224 px, batch 256
    python benchmarks/accelerator.py --tiny --out=t.json # 32 px, batch 4/device, 1 step (CPU smoke run)
    bash benchmarks/accelerator.sh --models=mobilenet_v2 --depthwise=shifted   # qkd_jax/models/depthwise.py

For ResNet-18 and MobileNetV2 at 224 px and each compute dtype (float32, bfloat16; see
docs/method.md, "Mixed precision"), three train steps: the FP cross-entropy step ('fp'), plain
QAT W4A4 ('qat_w4a4': interval quantizers, first/last layer 8-bit, labels) and SQAKD W4A4
('sqakd_w4a4': the same student, a frozen FP teacher forward, KL, no labels). For each:

    compile_s      lowering + XLA compilation (ahead of time, before the first call)
    step_s         median wall time of `--steps` calls after one warm-up call
    images_per_s   batch / step_s
    flops          FLOPs of one compiled step from XLA's cost analysis (forward + backward +
                   optimizer; the whole step as compiled, so fused elementwise work counts too)
    mfu            flops / step_s / peak, the peak from PEAK_TFLOPS for the device kind and the
                   compute dtype (None when the device is not in the table; `--peak-tflops` sets it)
    compiled_mb    arguments + outputs + temporaries of the compiled step (XLA memory analysis)
    peak_mb        the allocator's peak bytes in use so far in the process (GPU/TPU; None on CPU)

When `benchmarks/input_pipeline.py` exists, its host input-pipeline rows (images/s of the
ImageNet training input) are added to the JSON; otherwise that part is skipped. Prints a table
and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from qkd_jax import distill
from qkd_jax.models import copy_teacher_to_student, get_model, signed_inputs
from qkd_jax.quant import rules as qrules
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.train import parallel
from qkd_jax.train.optim import GroupSpec, build_optimizer
from qkd_jax.train.state import create_train_state
from qkd_jax.train.step import train_step

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = ("resnet18", "mobilenet_v2")
DTYPES = ("float32", "bfloat16")
CASES = ("fp", "qat_w4a4", "sqakd_w4a4")

#: Dense peak TFLOP/s by (device-kind substring, compute dtype), from the vendors' datasheets:
#: NVIDIA H100/H200 SXM (H200 has H100's compute): BF16 989, TF32 495 (fp32 matmuls and convs
#: run on TF32 tensor cores at XLA's default precision), A100 SXM: BF16 312, TF32 156;
#: Google Cloud TPU system architecture pages (bf16 per chip): v4 275, v5e 197, v5p 459, v6e 918
#: (fp32 at the default precision runs as bf16 passes on the MXU: the bf16 peak is the ceiling).
PEAK_TFLOPS: dict[tuple[str, str], float] = {
    ("H100", "bfloat16"): 989.0, ("H100", "float32"): 495.0,
    ("H200", "bfloat16"): 989.0, ("H200", "float32"): 495.0,
    ("A100", "bfloat16"): 312.0, ("A100", "float32"): 156.0,
    ("TPU v4", "bfloat16"): 275.0, ("TPU v4", "float32"): 275.0,
    ("TPU v5 lite", "bfloat16"): 197.0, ("TPU v5 lite", "float32"): 197.0,
    ("TPU v5e", "bfloat16"): 197.0, ("TPU v5e", "float32"): 197.0,
    ("TPU v5p", "bfloat16"): 459.0, ("TPU v5p", "float32"): 459.0,
    ("TPU v6", "bfloat16"): 918.0, ("TPU v6", "float32"): 918.0,
}


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """The table's dense peak for this device kind and compute dtype (None when unknown)."""
    for (kind, dt), value in PEAK_TFLOPS.items():
        if kind.lower() in device_kind.lower() and dt == dtype:
            return value
    return None


def compiled_flops(compiled: Any) -> float:
    """FLOPs of one call of an XLA-compiled function (its cost analysis)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def compiled_mb(compiled: Any) -> Optional[float]:
    """Arguments + outputs + temporaries of a compiled function in MiB (aliased buffers once)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)
    return total / 2**20


def _allocator_peak_mb() -> Optional[float]:
    stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
    return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def _networks(model: str, classes: int, dtype: Any, depthwise: str = "grouped"):
    """(teacher, W4A4 student): interval quantizers, first and last layer 8-bit, signed inputs declared."""
    extra = {"depthwise": depthwise} if model == "mobilenet_v2" else {}
    teacher = get_model(model, classes, axis_name="data", dtype=dtype, **extra)
    rules = qrules.with_signed_inputs(qrules.first_last_8bit("interval", 4, 4), signed_inputs(model))
    conv, dense = quantized_layers(rules)
    return teacher, get_model(model, classes, axis_name="data", dtype=dtype, conv=conv, dense=dense, **extra)


def _variables(teacher, student, size: int) -> tuple[dict, dict]:
    x = jnp.zeros((1, size, size, 3))
    local = lambda m: m.clone(axis_name=None)  # noqa: E731
    t_vars = jax.jit(lambda k: local(teacher).init(k, x, train=False))(jax.random.key(0))
    s_vars = jax.jit(lambda k: local(student).init(k, x, train=False))(jax.random.key(1))
    s_vars = {k: v for k, v in copy_teacher_to_student(t_vars, s_vars).items() if k != "perturbations"}
    return dict(t_vars), s_vars


def _time_steps(compiled: Any, state: Any, batch: Any, steps: int) -> float:
    """Median seconds per call over `steps` calls after one warm-up (the state is donated)."""
    state, _ = jax.block_until_ready(compiled(state, batch))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(model: str, dtype_name: str, size: int, batch: int, classes: int, steps: int,
                peak_override: Optional[float], cases: tuple[str, ...] = CASES,
                depthwise: str = "grouped") -> list[dict]:
    """The train-step rows (`cases`) of one model and compute dtype."""
    mesh = parallel.make_mesh()
    dtype = jnp.dtype(dtype_name)
    teacher, student = _networks(model, classes, dtype, depthwise)
    t_vars, s_vars = _variables(teacher, student, size)
    tx = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4),
                         GroupSpec(optimizer="adam", learning_rate=1e-5), steps_per_epoch=100, total_steps=100)
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(batch, size, size, 3)).astype(np.float32),
            "label": rng.integers(0, classes, batch).astype(np.int32)}
    labelled = parallel.shard_batch(data, mesh)
    unlabelled = parallel.shard_batch({"image": data["image"]}, mesh)
    kind = jax.devices()[0].device_kind
    peak = peak_override if peak_override is not None else peak_tflops(kind, dtype_name)
    settings = {
        "fp": (teacher, t_vars, None, distill.task(), labelled),
        "qat_w4a4": (student, s_vars, None, distill.task(), labelled),
        "sqakd_w4a4": (student, s_vars, (teacher, t_vars), distill.sqakd(), unlabelled),
    }
    rows = []
    for case in cases:
        net, variables, teach, objective, b = settings[case]
        state = create_train_state(
            apply_fn=net.apply, variables=jax.tree.map(lambda a: jnp.array(a, copy=True), variables),
            tx=tx, rng=jax.random.key(2),
            teacher_apply_fn=teach[0].apply if teach else None, teacher_variables=teach[1] if teach else None)
        state = parallel.replicate(state, mesh)
        step = parallel.compile_train_step(functools.partial(train_step, objective=objective), mesh)
        t0 = time.perf_counter()
        compiled = step.lower(state, b).compile()
        compile_s = time.perf_counter() - t0
        flops = compiled_flops(compiled)
        step_s = _time_steps(compiled, state, b, steps)
        rows.append(dict(model=model, dtype=dtype_name, case=case, size=size, batch=batch, depthwise=depthwise,
                         compile_s=compile_s, step_s=step_s, images_per_s=batch / step_s, flops=flops,
                         peak_tflops=peak, mfu=(flops / step_s / (peak * 1e12)) if peak else None,
                         compiled_mb=compiled_mb(compiled), peak_mb=_allocator_peak_mb()))
    return rows


def input_pipeline_rows(batch: int, tiny: bool) -> Optional[dict]:
    """The host input-pipeline benchmark (benchmarks/input_pipeline.py) when that module exists."""
    path = os.path.join(HERE, "input_pipeline.py")
    if not os.path.isfile(path):
        return None
    spec = importlib.util.spec_from_file_location("qkd_input_pipeline_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, HERE)
    try:
        spec.loader.exec_module(module)
        args = ["--images", "64" if tiny else "1024", "--batch", str(min(batch, 64)), "--batches",
                "2" if tiny else "12", "--size", "32" if tiny else "224", "--workers", "0" if tiny else "0,2",
                "--out", os.devnull]
        return module.main(args)
    finally:
        sys.path.remove(HERE)


def format_table(rows: list[dict]) -> str:
    head = (f"{'model':13s} {'dtype':9s} {'case':11s} {'batch':>5s} {'compile s':>9s} {'step ms':>9s} "
            f"{'img/s':>9s} {'GFLOP':>9s} {'MFU %':>6s} {'comp MB':>8s} {'peak MB':>8s}")
    lines = [head]
    for r in rows:
        mfu = f"{100 * r['mfu']:6.1f}" if r["mfu"] is not None else f"{'-':>6s}"
        comp = f"{r['compiled_mb']:8.0f}" if r["compiled_mb"] is not None else f"{'-':>8s}"
        peak = f"{r['peak_mb']:8.0f}" if r["peak_mb"] is not None else f"{'-':>8s}"
        lines.append(f"{r['model']:13s} {r['dtype']:9s} {r['case']:11s} {r['batch']:5d} {r['compile_s']:9.1f} "
                     f"{1e3 * r['step_s']:9.2f} {r['images_per_s']:9.1f} {r['flops'] / 1e9:9.2f} {mfu} {comp} {peak}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {MODELS}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated, from {DTYPES}")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {CASES}")
    ap.add_argument("--depthwise", default="grouped", choices=("grouped", "shifted"),
                    help="MobileNetV2's depthwise convs: XLA grouped convs or sums of shifted products")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256, help="global batch (divisible by the device count)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per case (after one warm-up)")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="dense peak TFLOP/s for the MFU when the device is not in PEAK_TFLOPS")
    ap.add_argument("--tiny", action="store_true", help="32 px, batch 4 per device, 10 classes, 1 step: a CPU smoke run")
    ap.add_argument("--no-input-pipeline", action="store_true", help="skip the host input-pipeline rows")
    ap.add_argument("--out", default="accelerator_results.json")
    args = ap.parse_args(argv)
    if args.tiny:
        args.size, args.batch, args.classes, args.steps = 32, 4 * jax.device_count(), 10, 1
    models, dtypes, cases = args.models.split(","), args.dtypes.split(","), tuple(args.cases.split(","))
    for name, given, known in (("--models", models, MODELS), ("--dtypes", dtypes, DTYPES), ("--cases", cases, CASES)):
        if not set(given) <= set(known):
            ap.error(f"{name}={','.join(given)}: choose from {','.join(known)}")
    if args.batch % jax.device_count():
        ap.error(f"--batch={args.batch} is not divisible by the {jax.device_count()} devices; pick a multiple")
    rows = []
    for model in models:
        for dtype in dtypes:
            rows.extend(bench_model(model, dtype, args.size, args.batch, args.classes, args.steps,
                                    args.peak_tflops, cases, args.depthwise))
    device = jax.devices()[0]
    meta = dict(device_kind=device.device_kind, backend=jax.default_backend(), devices=jax.device_count(),
                jax=jax.__version__, host=platform.processor() or platform.machine(), steps=args.steps)
    pipeline = None if args.no_input_pipeline else input_pipeline_rows(args.batch, args.tiny)
    result = {"meta": meta, "rows": rows, "input_pipeline": pipeline}
    print(f"device: {device.device_kind} x{jax.device_count()} ({jax.default_backend()}), jax {jax.__version__}")
    print(format_table(rows))
    if pipeline is None:
        print("input pipeline: skipped (no benchmarks/input_pipeline.py, or --no-input-pipeline)")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
