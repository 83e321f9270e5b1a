"""Model zoo behaviour: forward shapes, option-A shortcut, conv/dense injection, teacher->student
copy, and BatchNorm statistics synchronised over a named device axis.

Variables are drawn with numpy from ``jax.eval_shape`` shapes (``model.init`` under jit costs
seconds per model on CPU); only a few small forward passes are compiled.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict, freeze
from jax.sharding import Mesh, PartitionSpec as P

from qkd_jax.models import copy_teacher_to_student, get_model, image_size, list_models, option_a_shortcut
from qkd_jax.models.cifar_resnet import CifarBasicBlock
from qkd_jax.models.layers import BatchNorm

# `dtype`: the model's compute dtype, bound into the factories by `layers.compute_layers`.
CONV_KWARGS = {"strides", "padding", "use_bias", "feature_group_count", "name", "dtype"}


def small_size(name: str) -> int:
    return 32 if image_size(name) == 32 else 64


def random_variables(model: nn.Module, x: jax.Array, seed: int = 0) -> dict[str, Any]:
    """Variables with the model's shapes: N(0, 1/fan_in) weights, BN mean 0 / var 1, zero quantizer state."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: jax.ShapeDtypeStruct) -> jax.Array:
        key = path[-1].key
        if key == "var":
            return jnp.ones(leaf.shape, leaf.dtype)
        if key == "scale":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        if key == "kernel":
            return jnp.asarray(rng.normal(0.0, 1.0 / math.sqrt(math.prod(leaf.shape[:-1])), leaf.shape), leaf.dtype)
        return jnp.asarray(0.1 * rng.normal(size=leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


# ----------------------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert list_models() == sorted(
        ["resnet20", "resnet32", "resnet56", "vgg8", "vgg11", "vgg13", "resnet18", "resnet34", "resnet50",
         "vgg11_bn", "vgg11_bn_tiny", "mobilenet_v2", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
         "squeezenet1_0", "efficientnet_b0"]
    )
    with pytest.raises(ValueError, match="unknown model 'resnet19'.*resnet20.*vgg8"):
        get_model("resnet19", 10)


def test_registry_passes_module_options() -> None:
    model = get_model("resnet20", 10, axis_name="batch", dtype=jnp.bfloat16)
    assert (model.axis_name, model.dtype, model.depth) == ("batch", jnp.bfloat16, 20)


# ----------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize(
    "name,size", [("resnet20", 32), ("vgg8", 32), ("resnet18", 64), ("shufflenet_v2_x0_5", 64), ("squeezenet1_0", 64)]
)
def test_forward_shape_eval(name: str, size: int) -> None:
    model = get_model(name, 7)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), jnp.float32)
    logits = jax.jit(functools.partial(model.apply, train=False))(random_variables(model, x), x)
    assert logits.shape == (2, 7)
    assert bool(jnp.all(jnp.isfinite(logits)))


def test_forward_train_updates_batch_stats() -> None:
    model = get_model("resnet20", 10)
    x = jnp.asarray(np.random.default_rng(2).normal(1.0, 1.0, size=(4, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x)
    apply = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, updates = apply(variables, x)
    assert logits.shape == (4, 10)
    old, new = variables["batch_stats"]["stem_bn"]["mean"], updates["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(old, new)


@pytest.mark.parametrize("name", list_models())
def test_every_model_traces_at_small_size(name: str) -> None:
    model = get_model(name, 5)
    size = small_size(name)
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    out = jax.eval_shape(functools.partial(model.apply, train=False), variables, jnp.zeros((3, size, size, 3)))
    assert out.shape == (3, 5)


# ----------------------------------------------------------------------------- option-A shortcut


def test_option_a_shortcut_hand_check() -> None:
    x = np.zeros((1, 4, 4, 16), np.float32)
    for h in range(4):
        for w in range(4):
            for c in range(16):
                x[0, h, w, c] = 1.0 + 100 * h + 10 * w + 0.01 * c
    # planes 32: keep rows/cols 0 and 2, put the 16 input channels at 8..23, zeros elsewhere.
    expected = np.zeros((1, 2, 2, 32), np.float32)
    for i in range(2):
        for j in range(2):
            for c in range(16):
                expected[0, i, j, 8 + c] = 1.0 + 100 * (2 * i) + 10 * (2 * j) + 0.01 * c
    np.testing.assert_array_equal(option_a_shortcut(jnp.asarray(x), 32), expected)

    # Whole block with zero conv kernels and identity BN: output = relu(shortcut(x)).
    block = CifarBasicBlock(32, 2, nn.Conv, functools.partial(BatchNorm, use_running_average=True))
    identity = {"kernel": 0.0, "scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0}
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: jnp.full(v.shape, identity[p[-1].key], v.dtype),
        jax.eval_shape(block.init, jax.random.key(0), jnp.asarray(x)),
    )
    np.testing.assert_allclose(block.apply(variables, jnp.asarray(x)), expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="needs in = planes / 2"):
        option_a_shortcut(jnp.zeros((1, 4, 4, 16)), 48)


# ----------------------------------------------------------------------------- injection


def count_kernels(params: Any, ndim: int) -> int:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return sum(leaf.ndim == ndim for path, leaf in leaves if path[-1].key == "kernel")


@pytest.mark.parametrize("name", list_models())
def test_every_conv_and_dense_goes_through_the_factories(name: str) -> None:
    convs: list[str] = []
    denses: list[str] = []

    def conv(features: int, kernel_size: tuple[int, int], **kwargs: Any) -> nn.Module:
        assert set(kwargs) <= CONV_KWARGS and "name" in kwargs, kwargs
        convs.append(kwargs["name"])
        return nn.Conv(features, kernel_size, **kwargs)

    def dense(features: int, **kwargs: Any) -> nn.Module:
        assert set(kwargs) <= {"use_bias", "name", "dtype"} and "name" in kwargs, kwargs
        denses.append(kwargs["name"])
        return nn.Dense(features, **kwargs)

    model = get_model(name, 5, conv=conv, dense=dense)
    size = small_size(name)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]
    assert len(convs) == count_kernels(params, 4) > 0
    assert len(denses) == count_kernels(params, 2)
    assert convs[0] == "stem" and "stem" in params
    assert "classifier" in params and "classifier" in convs + denses


def test_layer_names() -> None:
    def top_level(name: str) -> list[str]:
        model = get_model(name, 10)
        return list(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])

    assert sorted(top_level("vgg13")) == sorted(
        ["stem", "stem_bn", "stage1_conv2", "stage1_bn2", "classifier"]
        + [f"stage{i}_{kind}{j}" for i in range(2, 6) for j in (1, 2) for kind in ("conv", "bn")]
    )
    assert sorted(top_level("vgg8")) == sorted(
        ["stem", "stem_bn", "classifier"] + [f"stage{i}_{kind}1" for i in range(2, 6) for kind in ("conv", "bn")]
    )
    assert sorted(top_level("resnet20")) == sorted(
        ["stem", "stem_bn", "head_bn", "classifier"] + [f"layer{i}_{j}" for i in (1, 2, 3) for j in range(3)]
    )


# ----------------------------------------------------------------------------- teacher -> student


class _Quant(nn.Module):
    @nn.compact
    def __call__(self) -> jax.Array:
        return self.param("lower", nn.initializers.zeros, ())


class FakeQConv(nn.Conv):
    """Stand-in for the quantized conv: a ``quant`` sub-tree and a ``quant_delta`` variable, identity maths."""

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        lower = _Quant(name="quant")()
        delta = self.variable("quant_delta", "delta", lambda: jnp.zeros(()))
        return super().__call__(inputs + 0.0 * lower + 0.0 * delta.value)


def test_copy_teacher_to_student() -> None:
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 32, 32, 3)), jnp.float32)
    teacher = get_model("resnet20", 10)
    student = get_model("resnet20", 10, conv=FakeQConv)
    t_vars = random_variables(teacher, x, seed=1)
    s_vars = random_variables(student, x, seed=2)
    s_vars["params"]["layer2_0"]["conv1"]["quant"]["lower"] = jnp.float32(-0.5)

    out = copy_teacher_to_student(t_vars, s_vars)
    for path, leaf in jax.tree_util.tree_leaves_with_path(t_vars):
        copied = functools.reduce(lambda tree, key: tree[key.key], path, out)
        np.testing.assert_array_equal(copied, leaf)
    assert float(out["params"]["layer2_0"]["conv1"]["quant"]["lower"]) == -0.5
    assert out["quant_delta"] is not None
    jax.tree.map(np.testing.assert_array_equal, out["quant_delta"], s_vars["quant_delta"])
    # Pure: the student input is untouched.
    assert not np.array_equal(s_vars["params"]["stem"]["kernel"], t_vars["params"]["stem"]["kernel"])

    frozen = copy_teacher_to_student(freeze(t_vars), freeze(s_vars))
    assert isinstance(frozen, FrozenDict)
    np.testing.assert_array_equal(frozen["params"]["stem"]["kernel"], t_vars["params"]["stem"]["kernel"])

    # Same paths, identity quantizer: the student computes the teacher's function.
    np.testing.assert_allclose(jax.jit(student.apply)(out, x), jax.jit(teacher.apply)(t_vars, x), rtol=1e-5, atol=1e-5)


def test_copy_errors_name_the_path() -> None:
    x = jnp.zeros((1, 32, 32, 3))
    vgg10 = random_variables(get_model("vgg8", 10), x)
    vgg100 = random_variables(get_model("vgg8", 100), x)
    mismatch = r"shape mismatch at params/classifier/bias: teacher \(10,\), student \(100,\)"
    with pytest.raises(ValueError, match=mismatch):
        copy_teacher_to_student(vgg10, vgg100)
    partial_student = {**vgg10, "params": {k: v for k, v in vgg10["params"].items() if k != "stage2_conv1"}}
    with pytest.raises(KeyError, match="teacher variable params/stage2_conv1/bias has no counterpart"):
        copy_teacher_to_student(vgg10, partial_student)
    with pytest.raises(KeyError, match="no collection 'batch_stats'"):
        copy_teacher_to_student(vgg10, {"params": vgg10["params"]})


# ----------------------------------------------------------------------------- BatchNorm over devices


def _train_apply(model: nn.Module):
    return functools.partial(model.apply, train=True, mutable=["batch_stats"])


@pytest.mark.parametrize("mode", ["pmap", "shard_map"])
def test_batchnorm_statistics_sync_across_devices(mode: str) -> None:
    assert jax.device_count() >= 2
    x = jnp.asarray(np.random.default_rng(4).normal(0.5, 2.0, size=(8, 8, 8, 3)), jnp.float32)
    single = get_model("resnet20", 10)
    variables = random_variables(single, x)
    ref_logits, ref = jax.jit(_train_apply(single))(variables, x)

    synced = _train_apply(get_model("resnet20", 10, axis_name="batch"))
    if mode == "pmap":
        replicated = jax.tree.map(lambda v: jnp.stack([v, v]), variables)
        logits, stats = jax.pmap(synced, axis_name="batch")(replicated, x.reshape(2, 4, 8, 8, 3))
        logits, stats = logits.reshape(8, 10), jax.tree.map(lambda v: v[1], stats)
    else:
        mesh = Mesh(np.array(jax.devices()[:2]), ("batch",))
        fn = jax.shard_map(synced, mesh=mesh, in_specs=(P(), P("batch")), out_specs=(P("batch"), P()))
        logits, stats = jax.jit(fn)(variables, x)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats, ref)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
