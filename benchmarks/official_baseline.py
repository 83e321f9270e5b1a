"""Side by side on one device: the official SQAKD PyTorch train step vs qkd_jax's (not a test).

    git clone https://github.com/kaiqi123/SQAKD /tmp/SQAKD        # the official code, kept outside this repository
    python benchmarks/official_baseline.py --sqakd-src=/tmp/SQAKD --device=cuda   # one GPU host
    python benchmarks/official_baseline.py --sqakd-src=/tmp/SQAKD --tiny          # CPU smoke run

Nothing of the official code is copied here: the script imports its CIFAR model file
(`CIFAR/models/custom_models_resnet.py`: `resnet20_fp` teacher, `resnet20_quant` student with its
EWGS interval `QConv`s, first conv and classifier float) from the clone named by `--sqakd-src`
(or `$SQAKD_SRC`), initialises the quantizers the way its `utils.init_quant_model` does (one
forward with `init=1`) and runs the step of its `train_quant.py`:

    sqakd  frozen FP teacher forward (no grad) + student forward, DistillKL(T=4) (no labels),
           backward, Adam on the weights (1e-3) and Adam on the quantizer parameters (1e-5)
    fp     the FP network alone, cross-entropy, Adam 1e-3

The qkd_jax side is the same network and objective: CIFAR ResNet-20, the interval (EWGS)
quantizer at the same bits with the first conv and the classifier float
(`quant.rules.sqakd_cifar`), `distill.sqakd()` / `distill.task()`, the same two Adam groups, one
compiled `train_step` on a mesh of the device. Both sides get the same random batch (NCHW for
torch, NHWC for JAX).

Timing: `--rounds` rounds; in each, `--steps` timed steps of one side then `--steps` of the other
(the side that goes first alternates), after one untimed warm-up step per side and round. A step
is timed to completion (`torch.cuda.synchronize()` / `jax.block_until_ready`). Printed: the
median seconds per step of each side, the ratio qkd_jax / official (above 1: qkd_jax slower), the
ratio of each round's medians (their spread is the noise), and a JSON file with everything.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

CASES = ("sqakd", "fp")


def load_official(src: str) -> Any:
    """The official CIFAR model module from a clone of the SQAKD repository (one clear error if absent)."""
    cifar = os.path.join(os.path.abspath(src), "CIFAR")
    if not os.path.isfile(os.path.join(cifar, "models", "custom_models_resnet.py")):
        raise SystemExit(f"--sqakd-src={src}: no CIFAR/models/custom_models_resnet.py there; clone the official "
                         "code first: git clone https://github.com/kaiqi123/SQAKD <dir> and pass --sqakd-src=<dir>")
    sys.path.insert(0, cifar)
    import importlib

    with contextlib.redirect_stdout(io.StringIO()):  # its constructors print in colour
        return importlib.import_module("models.custom_models_resnet")


def official_args(w_bits: int, a_bits: int, classes: int) -> argparse.Namespace:
    """The fields of train_quant.py's argparse namespace that the official model reads (EWGS, delta 0)."""
    return argparse.Namespace(num_classes=classes, QWeightFlag=True, QActFlag=True, baseline=False,
                               weight_levels=2 ** w_bits, act_levels=2 ** a_bits,
                               bkwd_scaling_factorW=0.0, bkwd_scaling_factorA=0.0)


def official_step(module: Any, case: str, images: Any, labels: Any, w_bits: int, a_bits: int, classes: int,
                  device: str) -> Callable[[], None]:
    """One official train step as a closure (networks, optimizers and the batch bound)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    args = official_args(w_bits, a_bits, classes)
    with contextlib.redirect_stdout(io.StringIO()):
        teacher = module.resnet20_fp(args).to(device)
        student = module.resnet20_quant(args).to(device) if case == "sqakd" else None
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(device)
    y = torch.from_numpy(labels.astype("int64")).to(device)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    if case == "fp":
        teacher.train()
        opt = torch.optim.Adam(teacher.parameters(), lr=1e-3)

        def step() -> None:
            loss = F.cross_entropy(teacher(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sync()
        return step

    student.load_state_dict(teacher.state_dict(), strict=False)
    qconv = type(next(m for m in student.modules() if hasattr(m, "act_quantization")))
    for m in student.modules():  # utils.init_quant_model: one forward with init=1
        if isinstance(m, qconv):
            m.init.data.fill_(1)
    student.train()
    with torch.no_grad():
        student(x)
    for m in student.modules():
        if isinstance(m, qconv):
            m.init.data.fill_(0)
    quant_names = ("lW", "uW", "lA", "uA", "lA_t", "uA_t", "output_scale")
    quant = [p for n, p in student.named_parameters() if n.rsplit(".", 1)[-1] in quant_names]
    ids = {id(p) for p in quant}
    weights = [p for p in student.parameters() if id(p) not in ids]
    opt_m, opt_q = torch.optim.Adam(weights, lr=1e-3), torch.optim.Adam(quant, lr=1e-5)
    teacher.eval()
    temperature = 4.0

    def step() -> None:
        with torch.no_grad():
            logit_t = teacher(x)
        logit_s = student(x)
        p_s = F.log_softmax(logit_s / temperature, dim=1)  # DistillKL(T=4) of distiller_zoo/KD.py
        p_t = F.softmax(logit_t / temperature, dim=1)
        loss = F.kl_div(p_s, p_t, reduction="sum") * temperature ** 2 / logit_s.shape[0]
        opt_m.zero_grad(set_to_none=True)
        opt_q.zero_grad(set_to_none=True)
        loss.backward()
        opt_m.step()
        opt_q.step()
        sync()
    return step


def jax_step(case: str, images: Any, labels: Any, w_bits: int, a_bits: int, classes: int) -> Callable[[], None]:
    """The qkd_jax train step of the same case as a closure (compiled before it is returned)."""
    import jax
    import jax.numpy as jnp

    from qkd_jax import distill
    from qkd_jax.models import copy_teacher_to_student, get_model
    from qkd_jax.quant import rules as qrules
    from qkd_jax.quant.layers import quantized_layers
    from qkd_jax.train import parallel
    from qkd_jax.train.optim import GroupSpec, build_optimizer
    from qkd_jax.train.state import create_train_state
    from qkd_jax.train.step import train_step

    mesh = parallel.make_mesh(jax.devices()[:1])
    teacher = get_model("resnet20", classes, axis_name="data")
    conv, dense = quantized_layers(qrules.sqakd_cifar("interval", w_bits, a_bits))
    student = get_model("resnet20", classes, axis_name="data", conv=conv, dense=dense)
    size = images.shape[1]
    x0 = jnp.zeros((1, size, size, 3))
    local = lambda m: m.clone(axis_name=None)  # noqa: E731
    t_vars = jax.jit(lambda k: local(teacher).init(k, x0, train=False))(jax.random.key(0))
    adam = GroupSpec(optimizer="adam", learning_rate=1e-3)
    tx = build_optimizer(adam, GroupSpec(optimizer="adam", learning_rate=1e-5), steps_per_epoch=100,
                         total_steps=100)
    fresh = lambda tree: jax.tree.map(lambda a: jnp.array(a, copy=True), tree)  # noqa: E731  (donated buffers)
    if case == "fp":
        state = create_train_state(apply_fn=teacher.apply, variables=fresh(dict(t_vars)), tx=tx, rng=jax.random.key(2))
        batch = {"image": images, "label": labels.astype("int32")}
        objective = distill.task()
    else:
        s_vars = jax.jit(lambda k: local(student).init(k, x0, train=False))(jax.random.key(1))
        s_vars = {k: v for k, v in copy_teacher_to_student(t_vars, s_vars).items() if k != "perturbations"}
        state = create_train_state(apply_fn=student.apply, variables=fresh(s_vars), tx=tx, rng=jax.random.key(2),
                                   teacher_apply_fn=teacher.apply, teacher_variables=dict(t_vars))
        batch = {"image": images}
        objective = distill.sqakd()
    state = parallel.replicate(state, mesh)
    batch = parallel.shard_batch(batch, mesh)
    compiled = parallel.compile_train_step(functools.partial(train_step, objective=objective), mesh)
    compiled = compiled.lower(state, batch).compile()
    holder = {"state": state}

    def step() -> None:
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
    return step


def _timed(step: Callable[[], None], steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        out.append(time.perf_counter() - t0)
    return out


def alternate(official: Callable[[], None], ours: Callable[[], None], rounds: int, steps: int) -> dict:
    """Round r times `steps` steps of each side, official first in even rounds, qkd_jax first in odd
    ones, each after one untimed warm-up step; the per-step seconds of both sides and per-round medians."""
    times: dict[str, list[float]] = {"official": [], "qkd_jax": []}
    per_round = []
    sides = {"official": official, "qkd_jax": ours}
    for r in range(rounds):
        order = ("official", "qkd_jax") if r % 2 == 0 else ("qkd_jax", "official")
        medians = {}
        for name in order:
            sides[name]()  # warm-up: caches, allocator, clocks
            t = _timed(sides[name], steps)
            times[name].extend(t)
            medians[name] = statistics.median(t)
        per_round.append(medians)
    return {"times": times, "per_round": per_round}


def summarize(case: str, result: dict) -> dict:
    """Medians per side, the overall ratio (qkd_jax / official) and each round's ratio."""
    off, ours = statistics.median(result["times"]["official"]), statistics.median(result["times"]["qkd_jax"])
    rounds = [r["qkd_jax"] / r["official"] for r in result["per_round"]]
    return {"case": case, "official_s": off, "qkd_jax_s": ours, "ratio": ours / off, "round_ratios": rounds,
            "times": result["times"]}


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sqakd-src", default=os.environ.get("SQAKD_SRC"),
                    help="a clone of the official SQAKD repository (default $SQAKD_SRC)")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {CASES}")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda (JAX uses its default backend)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--bits", default="2,2", help="W,A bits of the student (default 2,2)")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side and round")
    ap.add_argument("--tiny", action="store_true", help="batch 4, 2 rounds of 1 step: a CPU smoke run")
    ap.add_argument("--out", default="official_baseline.json")
    args = ap.parse_args(argv)
    if not args.sqakd_src:
        ap.error("--sqakd-src is required (or set $SQAKD_SRC): a clone of https://github.com/kaiqi123/SQAKD")
    if args.tiny:
        args.batch, args.rounds, args.steps = 4, 2, 1
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        ap.error(f"--cases={args.cases}: choose from {','.join(CASES)}")
    w_bits, a_bits = (int(b) for b in args.bits.split(","))
    import jax
    import numpy as np
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device=cuda: torch sees no CUDA device here; use --device=cpu")
    module = load_official(args.sqakd_src)
    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
    labels = rng.integers(0, args.classes, args.batch)
    rows = []
    for case in cases:
        official = official_step(module, case, images, labels, w_bits, a_bits, args.classes, args.device)
        ours = jax_step(case, images, labels, w_bits, a_bits, args.classes)
        rows.append(summarize(case, alternate(official, ours, args.rounds, args.steps)))
    jdev = jax.devices()[0]
    meta = {"torch_device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor()
            or platform.machine(), "jax_device": f"{jdev.device_kind} ({jax.default_backend()})",
            "torch": torch.__version__, "jax": jax.__version__, "batch": args.batch, "size": args.size,
            "bits": [w_bits, a_bits], "rounds": args.rounds, "steps": args.steps, "torch_threads": torch.get_num_threads()}
    print(f"torch {meta['torch']} on {meta['torch_device']} ({args.device}); jax {meta['jax']} on {meta['jax_device']}")
    print(f"CIFAR ResNet-20, W{w_bits}A{a_bits}, batch {args.batch}, {args.size} px; "
          f"{args.rounds} alternating rounds x {args.steps} steps")
    print(f"{'case':6s} {'official s':>11s} {'qkd_jax s':>10s} {'ratio':>6s}  per-round ratios")
    for r in rows:
        spread = " ".join(f"{x:.2f}" for x in r["round_ratios"])
        print(f"{r['case']:6s} {r['official_s']:11.4f} {r['qkd_jax_s']:10.4f} {r['ratio']:6.2f}  {spread}")
    print("ratio = qkd_jax / official seconds per step (above 1: qkd_jax slower)")
    result = {"meta": meta, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
