"""Step-time benchmark of the compiled train and eval steps (not a test).

    python benchmarks/step_time.py                          # CIFAR ResNet-20 b256 + ResNet-18 224 b64
    python benchmarks/step_time.py --only=resnet20 --steps=5 --out=bench.json
    python benchmarks/step_time.py --only=resnet18 --batch=256 --bf16   # on a GPU host

For each setting: the FP cross-entropy step, the plain QAT step (W2A2 interval quantizers,
labels), the SQAKD step (W2A2 student + frozen FP teacher forward, KL, no labels) and the eval
step; compile time (first call) and steady-state time per step (median of `--steps` timed calls
after one warm-up), images/s, and peak memory (GPU: the allocator's peak; CPU: the process's
peak RSS). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import resource
import statistics
import time

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
from qkd_jax.train.step import eval_step, train_step

SETTINGS = {
    "resnet20": dict(model="resnet20", classes=10, size=32, batch=256, preset=qrules.sqakd_cifar),
    "resnet18": dict(model="resnet18", classes=1000, size=224, batch=64, preset=qrules.first_last_8bit),
}


def _peak_memory_mb() -> float:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _time(fn, args, steps: int, donate_state: bool):
    """(compile+first call seconds, median seconds per call)."""
    state, batch = args
    t0 = time.perf_counter()
    out = fn(state, batch)
    jax.block_until_ready(out)
    first = time.perf_counter() - t0
    state = out[0] if donate_state else state
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        out = fn(state, batch)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
        if donate_state:
            state = out[0]
    return first, statistics.median(times[1:])


def bench(name: str, steps: int, batch: int | None, bf16: bool) -> list[dict]:
    s = SETTINGS[name]
    batch = batch or s["batch"]
    mesh = parallel.make_mesh()
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    build = lambda **kw: get_model(s["model"], s["classes"], axis_name="data", dtype=dtype, **kw)  # noqa: E731
    teacher = build()
    conv, dense = quantized_layers(qrules.with_signed_inputs(s["preset"]("interval", 2, 2), signed_inputs(s["model"])))
    student = build(conv=conv, dense=dense)
    x = jnp.zeros((1, s["size"], s["size"], 3))
    local = lambda m: m.clone(axis_name=None)  # noqa: E731
    t_vars = jax.jit(lambda k: local(teacher).init(k, x, train=False))(jax.random.key(0))
    s_vars = jax.jit(lambda k: local(student).init(k, x, train=False))(jax.random.key(1))
    s_vars = {k: v for k, v in copy_teacher_to_student(t_vars, s_vars).items() if k != "perturbations"}
    tx = build_optimizer(GroupSpec(optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=1e-4),
                         GroupSpec(optimizer="adam", learning_rate=1e-5), steps_per_epoch=100, total_steps=100)
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(batch, s["size"], s["size"], 3)).astype(np.float32),
            "label": rng.integers(0, s["classes"], batch).astype(np.int32)}
    gbatch = parallel.shard_batch(data, mesh)
    nolabel = parallel.shard_batch({"image": data["image"]}, mesh)
    rows = []
    cases = [
        ("fp_ce", teacher, dict(t_vars), None, distill.task(), gbatch),
        ("qat_w2a2", student, s_vars, None, distill.task(), gbatch),
        ("sqakd_w2a2", student, s_vars, (teacher, t_vars), distill.sqakd(), nolabel),
    ]
    for case, model, variables, teach, objective, b in cases:
        state = create_train_state(
            apply_fn=model.apply, variables=variables, tx=tx, rng=jax.random.key(2),
            teacher_apply_fn=teach[0].apply if teach else None,
            teacher_variables=teach[1] if teach else None,
        )
        step = parallel.compile_train_step(functools.partial(train_step, objective=objective), mesh)
        state = jax.tree.map(lambda a: jnp.array(a, copy=True), state)  # donation must not free s_vars
        first, per = _time(step, (parallel.replicate(state, mesh), b), steps, donate_state=True)
        rows.append(dict(setting=name, case=case, batch=batch, compile_s=first - per, step_s=per,
                         images_per_s=batch / per, peak_mb=_peak_memory_mb()))
    ev = parallel.compile_eval_step(functools.partial(eval_step, apply_fn=student.apply), mesh)
    evars = parallel.replicate(s_vars, mesh)
    first, per = _time(lambda v, bb: (ev(v, bb),), (evars, gbatch), steps, donate_state=False)
    rows.append(dict(setting=name, case="eval_w2a2", batch=batch, compile_s=first - per, step_s=per,
                     images_per_s=batch / per, peak_mb=_peak_memory_mb()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=sorted(SETTINGS), action="append")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=None, help="override the setting's global batch")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 activations (GPU/TPU)")
    ap.add_argument("--out", default="benchmark_results.json")
    args = ap.parse_args()
    rows = []
    for name in args.only or list(SETTINGS):
        rows.extend(bench(name, args.steps, args.batch, args.bf16))
    device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"
    meta = dict(device=device, jax=jax.__version__, cpu=platform.processor() or platform.machine(),
                bf16=args.bf16)
    print(f"device: {device}, jax {jax.__version__}")
    print(f"{'setting':9s} {'case':11s} {'batch':>5s} {'compile s':>9s} {'step s':>8s} {'img/s':>8s} {'peak MB':>8s}")
    for r in rows:
        print(f"{r['setting']:9s} {r['case']:11s} {r['batch']:5d} {r['compile_s']:9.1f} "
              f"{r['step_s']:8.3f} {r['images_per_s']:8.1f} {r['peak_mb']:8.0f}")
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
