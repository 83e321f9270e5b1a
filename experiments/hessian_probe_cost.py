"""Wall time of one EWGS delta refresh with the per-layer and the joint Hutchinson probe.

    python experiments/hessian_probe_cost.py [--config=configs/digits_demo.py] [--probes=2] [--repeats=2]
        [--batches=N] [--batch-size=B]

Builds the config's quantized student (calibrated on one batch of its training data, so the
quantizer parameters are realistic), then times `compute_ewgs_deltas` on the config's Hessian
batches (`quant.hessian_batches` x `quant.hessian_batch_size`, cross-entropy) with exactly
`--probes` probes per batch (rtol = 0: no early stop), once per probe kind. The first call
compiles; the reported time is the best of `--repeats` calls after it. Per-layer costs one
Hessian-vector product per probe and probed tensor, joint one per probe for all tensors, so
the ratio is about the number of probed tensors (docs/method.md section 5).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _config(path: pathlib.Path):
    spec = importlib.util.spec_from_file_location("qkd_probe_cost_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "digits_demo.py"))
    p.add_argument("--probes", type=int, default=2, help="probes per batch (per tensor for per_layer)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", type=int, default=0, help="override quant.hessian_batches (0: the config's)")
    p.add_argument("--batch-size", type=int, default=0, help="override quant.hessian_batch_size (0: the config's)")
    a = p.parse_args(argv)

    import jax
    import numpy as np
    import optax

    from qkd_jax.data.sources import get_source
    from qkd_jax.distill import get_objective
    from qkd_jax.quant.calibration import calibrate
    from qkd_jax.run import build
    from qkd_jax.train.ewgs_update import compute_ewgs_deltas
    from qkd_jax.train.state import create_train_state

    config = _config(pathlib.Path(a.config))
    q = config.quant
    q.hessian_batches = a.batches or q.hessian_batches
    q.hessian_batch_size = a.batch_size or q.hessian_batch_size
    model = build.student_network(config).local_model
    variables = build.init_variables(model, config, jax.random.key(0))
    source = get_source(config.dataset.name, "train", config.dataset.data_dir or None)
    n = q.hessian_batches * q.hessian_batch_size
    # raw uint8 images scaled to [0, 1]: the refresh's cost does not depend on the normalisation
    images = np.stack([np.asarray(source[i]["image"], np.float32) / 255.0 for i in range(n)])
    labels = np.asarray([int(source[i]["label"]) for i in range(n)], np.int32)
    variables = calibrate(model, variables, images[: q.hessian_batch_size], train=True)
    state = create_train_state(apply_fn=model.apply, variables=variables, tx=optax.sgd(0.1), rng=jax.random.key(1))
    batches = [{"image": images[k * q.hessian_batch_size:(k + 1) * q.hessian_batch_size],
                "label": labels[k * q.hessian_batch_size:(k + 1) * q.hessian_batch_size]}
               for k in range(q.hessian_batches)]
    tensors = len(jax.tree.leaves(jax.eval_shape(lambda: variables["quant_delta"])))
    objective = get_objective("task")
    print(f"{config.model.name} {q.method} W{q.w_bits}A{q.a_bits}, {tensors} probed tensors, "
          f"{q.hessian_batches} batches x {q.hessian_batch_size} images, {a.probes} probes per batch, "
          f"JAX {jax.__version__} on {jax.devices()[0].platform}")
    times = {}
    for probe in ("joint", "per_layer"):
        run = lambda: jax.block_until_ready(compute_ewgs_deltas(
            state, batches, objective, jax.random.key(2), max_probes=a.probes, rtol=0.0, probe=probe))
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        best = min(_timed(run) for _ in range(a.repeats))
        times[probe] = best
        hvps = a.probes * q.hessian_batches * (tensors if probe == "per_layer" else 1)
        print(f"{probe:>9}: {best:.2f} s per refresh ({hvps} Hessian-vector products; first call with "
              f"compilation {first:.2f} s)")
    print(f"per_layer / joint: {times['per_layer'] / times['joint']:.1f} x")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
