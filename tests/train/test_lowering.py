"""Every step of the paper configs lowered for TPU and CUDA on the 8 virtual CPU devices.

Each step is built by the runner's own functions (`run/train_phase.py`, `run/calibrate_phase.py`,
`run/evaluate.py`, `train/parallel.py`) from the config file, shrunk to 32 px and a batch of 16
(2 per device), and exported with `jax.export` for one platform from abstract, sharded inputs:
nothing is compiled or run. The lowered module must hold no platform-specific custom call (only
the SPMD partitioning markers every backend understands), no host callback and no float64. With
`compute_dtype='bfloat16'` every convolution of the networks takes bfloat16 operands, while the
quantizers' rounding, the parameters and the losses stay float32 (docs/method.md section 11).

Only the training split's and the eval split's records are faked (an in-memory source instead
of the prepared dataset): the steps' inputs are the loaders' real batches of them.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from qkd_jax import data as qdata
from qkd_jax.run import build
from qkd_jax.run.calibrate_phase import calibration_forward
from qkd_jax.run.config_schema import phase_names
from qkd_jax.run.context import PhaseResult, RunContext
from qkd_jax.run.evaluate import compiled_eval_step, eval_inputs
from qkd_jax.run.loaders import eval_batches, steps_per_epoch, train_loader
from qkd_jax.run.loop import validate_config
from qkd_jax.run.plan import make_plan
from qkd_jax.run.train_phase import compiled_train_step, initial_state, train_batches
from qkd_jax.train import parallel

# 72 exports of whole steps: 2.5 to 5 minutes on 2 busy CPU cores.
pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGE = 32
BATCH = 16
EXAMPLES = 32
PLATFORMS = ("tpu", "cuda")
# Custom-call targets every backend implements: the SPMD partitioner's markers (the portable
# part of jax.export's _CUSTOM_CALL_TARGETS_GUARANTEED_STABLE; the rest of that list are
# platform kernels such as LAPACK/cuSOLVER/cuRAND calls, which a step must not need).
PORTABLE_TARGETS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape", "annotate_device_placement"}

# (config file:ARG, phase, step): every phase kind of the three paper configs and the eval step
# of each of their networks. 'train': the phase's train step; 'calibrate': the calibration pass;
# 'eval': the eval step of the phase's network.
CASES = [
    ("cifar10_resnet20.py:sqakd,w2a2", "teacher", "train"),
    ("cifar10_resnet20.py:sqakd,w2a2", "teacher", "eval"),
    ("cifar10_resnet20.py:sqakd,w2a2", "calibrate", "calibrate"),
    ("cifar10_resnet20.py:sqakd,w2a2", "student", "train"),  # SQAKD
    ("cifar10_resnet20.py:sqakd,w2a2", "student", "eval"),
    ("cifar10_resnet20.py:qkd,w2a2", "co_study", "train"),  # QKD: the teacher is trained too
    ("cifar10_resnet20.py:crd,w2a2", "student", "train"),  # feature criterion with CRD's banks
    ("tiny_imagenet_resnet18.py:sqakd,pact,w4a4", "teacher", "train"),
    ("tiny_imagenet_resnet18.py:sqakd,pact,w4a4", "teacher", "eval"),
    ("tiny_imagenet_resnet18.py:sqakd,pact,w4a4", "calibrate", "calibrate"),
    ("tiny_imagenet_resnet18.py:sqakd,pact,w4a4", "student", "train"),
    ("tiny_imagenet_resnet18.py:sqakd,pact,w4a4", "student", "eval"),
    ("imagenet_resnet18.py:qkd,w2a2", "teacher", "train"),  # uint8 JPEG batches, normalised in the step
    ("imagenet_resnet18.py:qkd,w2a2", "teacher", "eval"),
    ("imagenet_resnet18.py:qkd,w2a2", "calibrate", "calibrate"),
    ("imagenet_resnet18.py:qkd,w2a2", "co_study", "train"),
    ("imagenet_resnet18.py:qkd,w2a2", "co_study", "eval"),
    ("imagenet_resnet18.py:sqakd,w2a2", "student", "train"),
]


def _load(spec: str):
    name, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location(f"_lowering_{name[:-3]}", ROOT / "configs" / name)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    assert arg in module.VARIANTS, (name, arg)
    return module.get_config(arg)


def _records(dataset: str, encoded: bool, seed: int) -> list[dict]:
    """EXAMPLES records shaped like the dataset's (JPEG bytes where `encoded`)."""
    info = qdata.dataset_info(dataset)
    rng = np.random.default_rng(seed)
    height, width, channels = info.image_shape
    shape = (height or 48, width or 40, channels)  # ImageNet's images vary in size
    records = []
    for i in range(EXAMPLES):
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        image = pixels
        if encoded:
            out = io.BytesIO()
            Image.fromarray(pixels).save(out, format="JPEG", quality=90)
            image = out.getvalue()
        records.append({"image": image, "label": i % info.num_classes})
    return records


def _shrink(config, compute_dtype: str):
    config.dataset.image_size = IMAGE
    config.dataset.eval_batch_size = BATCH
    config.data.num_workers = 0
    config.teacher_checkpoint = ""
    config.compute_dtype = compute_dtype
    for name in phase_names(config):
        config.phases[name].batch_size = BATCH
        config.phases[name].epochs = 1
        for group in ("weights", "quant_params", "teacher_opt"):  # shorter than the 1-epoch phase
            config.phases[name][group].warmup_steps = min(config.phases[name][group].warmup_steps, 1)
        if config.phases[name].feature == "crd":  # negatives drawn from the EXAMPLES fake records
            config.phases[name].feature_options.nce_k = EXAMPLES // 2
    return config


def _fresh_variables(ctx: RunContext, kind: str, seed: int) -> dict:
    """The shapes of a network's fresh variables (traced, not computed)."""
    model = ctx.network(kind).local_model
    return jax.eval_shape(lambda key: build.init_variables(model, ctx.config, key), jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _run(spec: str, compute_dtype: str):
    """The run's context and plans as `loop.run` builds them (fake sources), with every phase's
    result holding the shapes of fresh variables."""
    config = _shrink(_load(spec), compute_dtype)
    validate_config(config)
    info = qdata.dataset_info(config.dataset.name)
    sources = {(split, encoded): _records(config.dataset.name, encoded, seed)
               for seed, split in enumerate((info.train_split, info.eval_split)) for encoded in (False, True)}
    workdir = epath.Path("/tmp/qkd_lowering_unused")
    ctx = RunContext(config=config, workdir=workdir, mesh=parallel.make_mesh(), writer=None, sources=sources)
    plans = {name: make_plan(config, workdir, name, steps_per_epoch(ctx, config.phases[name].batch_size))
             for name in phase_names(config)}
    for i, (name, plan) in enumerate(plans.items()):
        teacher = _fresh_variables(ctx, "teacher", 100 + i) if plan.train_teacher else None
        ctx.results[name] = PhaseResult(name=name, kind=plan.kind, student=_fresh_variables(ctx, plan.kind, i),
                                        teacher=teacher, eval={})
    return ctx, plans


def _initial_state(ctx: RunContext, plan, net):
    """The shapes of the phase's `initial_state`, traced from the earlier phases' results."""
    results = ctx.results

    def build_from(arrays):
        ctx.results = {name: dataclasses.replace(r, student=arrays[name][0], teacher=arrays[name][1])
                       for name, r in results.items()}
        try:
            return initial_state(ctx, plan, net)
        finally:
            ctx.results = results

    return jax.eval_shape(build_from, {name: (r.student, r.teacher) for name, r in results.items()})


def _abstract(tree, sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding), tree)


def _lowered(spec: str, phase: str, step: str, compute_dtype: str, platform: str) -> jax.export.Exported:
    """The phase's train step, calibration pass or eval step exported for `platform`."""
    ctx, plans = _run(spec, compute_dtype)
    plan = plans[phase]
    replicated, split = NamedSharding(ctx.mesh, P()), NamedSharding(ctx.mesh, P(parallel.DATA_AXIS))
    net = ctx.network(plan.kind)
    if step == "calibrate":  # jitted on one device, as run_calibrate calls it
        variables = _fresh_variables(ctx, "student", 0)
        batch = next(iter(train_loader(ctx, plan.batch_size, 1, plan.seed, labels=False, sharded=False,
                                       workers=False)))
        return jax.export.export(calibration_forward(ctx, net), platforms=[platform])(
            _abstract(variables, None), _abstract(batch["image"], None))
    state = _initial_state(ctx, plan, net)
    if step == "train":
        batch = next(iter(train_batches(ctx, plan)))
        return jax.export.export(compiled_train_step(ctx, plan), platforms=[platform])(
            _abstract(state, replicated), _abstract(batch, split))
    batch = eval_inputs(next(iter(eval_batches(ctx))))
    return jax.export.export(compiled_eval_step(ctx, net.train_model), platforms=[platform])(
        _abstract(state.variables(), replicated), _abstract(batch, split))


def _id(case) -> str:
    spec, phase, step = case
    return f"{spec.split('.py')[0]}:{spec.partition(':')[2]}:{phase}:{step}"


def custom_call_targets(text: str) -> set[str]:
    """Every custom-call target of a module's text (pretty and generic op forms)."""
    return set(re.findall(r"stablehlo\.custom_call @([\w$.]+)", text)) | set(
        re.findall(r'call_target_name = "([^"]+)"', text))


def op_types(text: str, op: str) -> list[tuple[str, ...]]:
    """The element types in the type signature of every `stablehlo.<op>` of a module's text,
    operands then results: ('bf16', 'bf16', 'bf16') for a bfloat16 convolution."""
    types = []
    for line in text.splitlines():
        if re.search(rf"= stablehlo\.{op}\b", line):
            signature = re.sub(r" loc\(.*$", "", line.rsplit(" : ", 1)[-1])
            types.append(tuple(re.findall(r"tensor<(?:[^>]*x)?(\w+)>", signature)))
    return types


def _check_portable(exported: jax.export.Exported, platform: str) -> str:
    text = exported.mlir_module()
    assert exported.platforms == (platform,)
    targets = custom_call_targets(text)
    assert targets <= PORTABLE_TARGETS, targets - PORTABLE_TARGETS
    assert "callback" not in text  # a host callback lowers to a *_callback custom call
    assert not re.search(r"\bf64\b", text), re.findall(r".*\bf64\b.*", text)[:3]
    return text


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_step_lowers_without_platform_specific_ops(case, platform):
    text = _check_portable(_lowered(*case, "float32", platform), platform)
    convs = op_types(text, "convolution")
    assert convs and all(set(t) == {"f32"} for t in convs)


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_bfloat16_step_convolves_in_bfloat16_and_quantizes_in_float32(case, platform):
    spec, phase, step = case
    exported = _lowered(*case, "bfloat16", platform)
    text = _check_portable(exported, platform)
    convs, dots = op_types(text, "convolution"), op_types(text, "dot_general")
    # Every convolution of the networks takes and gives bfloat16; so does the classifier's matmul.
    assert len(convs) >= 19 and all(t == ("bf16", "bf16", "bf16") for t in convs), set(convs)
    if step != "calibrate":  # calibrating, a full-precision classifier's output has no use and is dropped
        assert ("bf16", "bf16", "bf16") in dots
    # The only float32 matmuls are the feature criterion's own (its heads and contrasts work on
    # the float32 features); nothing else mixes precisions.
    feature = getattr(_run(spec, "bfloat16")[1][phase].objective, "feature", None) is not None
    allowed = {("bf16", "bf16", "bf16"), ("f32", "f32", "f32")} if feature else {("bf16", "bf16", "bf16")}
    assert set(dots) <= allowed, set(dots)
    # The quantizers round in float32 (a student network; the FP teacher has none), and every
    # exp/log (softmax, cross-entropy, KL) is float32.
    rounding = [t for op in ("round_nearest_even", "round_nearest_afz", "floor", "ceil") for t in op_types(text, op)]
    quantized = phase != "teacher"
    assert bool(rounding) == quantized and all(set(t) == {"f32"} for t in rounding), rounding
    for op in ("exponential", "log"):
        assert all(set(t) == {"f32"} for t in op_types(text, op)), op
    # Parameters, optimizer state, batch statistics, metrics and losses leave the step in float32.
    floats = {str(a.dtype) for a in exported.out_avals if jnp.issubdtype(a.dtype, jnp.floating)}
    assert floats == {"float32"}
