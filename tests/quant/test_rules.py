"""Precision rules: presets on small models of our own, first match wins, errors."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.quant.calibration import calibrate
from qkd_jax.quant.layers import quantized_layers
from qkd_jax.quant.rules import (
    Rule,
    RuleSet,
    describe,
    first_last_8bit,
    full_precision,
    quantizable_paths,
    resolve,
    rule_set,
    sqakd_cifar,
    sqakd_cifar_vgg,
    uniform,
    with_signed_inputs,
)

# unsafe_rbg keys: the default threefry RNG costs seconds of XLA compile per shape on CPU
KEY = functools.partial(jax.random.key, impl="unsafe_rbg")


class TinyResNet(nn.Module):
    """stem, layer1_0/{conv1,conv2}, layer2_0/conv1, classifier (CIFAR ResNet naming)."""

    conv: type = nn.Conv
    dense: type = nn.Dense

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(4, (3, 3), use_bias=False, name="stem")(x))
        x = nn.relu(_Block(self.conv, 2, name="layer1_0")(x))
        x = nn.relu(self.conv(8, (3, 3), strides=2, use_bias=False, name="layer2_0_conv")(x))
        return self.dense(3, name="classifier")(x.mean(axis=(1, 2)))


class _Block(nn.Module):
    conv: type
    n: int

    @nn.compact
    def __call__(self, x):
        for i in range(1, self.n + 1):
            x = nn.relu(self.conv(4, (3, 3), use_bias=False, name=f"conv{i}")(x))
        return x


class TinyVGG(nn.Module):
    """stem, [stage1_conv2], stage2_conv1, stage3_conv1, classifier (CIFAR VGG naming)."""

    conv: type = nn.Conv
    dense: type = nn.Dense
    stage1: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(self.conv(4, (3, 3), name="stem")(x))
        for j in range(2, self.stage1 + 1):
            x = nn.relu(self.conv(4, (3, 3), name=f"stage1_conv{j}")(x))
        x = nn.relu(self.conv(6, (3, 3), name="stage2_conv1")(x))
        x = nn.relu(self.conv(6, (3, 3), name="stage3_conv1")(x))
        return self.dense(3, name="classifier")(x.mean(axis=(1, 2)))


X = jax.random.uniform(KEY(0), (2, 8, 8, 3), minval=-1.0, maxval=1.0)
RESNET_LAYERS = ["stem", "layer1_0/conv1", "layer1_0/conv2", "layer2_0_conv", "classifier"]


def _build(model_cls, rules, **kw):
    conv, dense = quantized_layers(rules)
    model = model_cls(conv=conv, dense=dense, **kw)

    @jax.jit
    def run(key):  # init, calibrate and forward in one compiled function
        variables = calibrate(model, model.init(key, X), X)
        return variables, model.apply(variables, X, mutable=["intermediates"])[1].get("intermediates", {})

    return run(KEY(1))


def _node(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


def _levels(inter, path, name="w_hat"):
    """Number of distinct fake-quantized values the layer used (None: layer not quantized)."""
    try:
        (value,) = _node(inter, path)[name]
    except KeyError:
        return None
    return len(np.unique(np.asarray(value)))


def _quantized_layers(variables):
    return sorted(p for p in quantizable_paths(variables) if _has_delta(variables, p))


def _has_delta(variables, path):
    try:
        _node(variables.get("quant_delta", {}), path)
        return True
    except KeyError:
        return False


def test_sqakd_cifar_preset():
    rules = sqakd_cifar("interval", 2, 3)
    variables, inter = _build(TinyResNet, rules)
    assert sorted(quantizable_paths(variables)) == sorted(RESNET_LAYERS)
    assert _quantized_layers(variables) == ["layer1_0/conv1", "layer1_0/conv2", "layer2_0_conv"]
    for fp in ("stem", "classifier"):
        assert "quant" not in _node(variables["params"], fp)
        assert _levels(inter, fp) is None
    for q in ("layer1_0/conv1", "layer1_0/conv2", "layer2_0_conv"):
        assert _levels(inter, q) <= 4 and _levels(inter, q, "a_hat") <= 8
    resolved = resolve(rules, variables)
    assert {p: (lp.method, lp.w_bits, lp.a_bits) for p, lp in resolved.items()} == {
        "stem": ("none", None, None), "classifier": ("none", None, None), "layer1_0/conv1": ("interval", 2, 3),
        "layer1_0/conv2": ("interval", 2, 3), "layer2_0_conv": ("interval", 2, 3)}


@pytest.mark.parametrize("stage1", [1, 2])
def test_sqakd_cifar_vgg_preset(stage1):
    rules = sqakd_cifar_vgg("interval", 2, 2)
    variables, inter = _build(TinyVGG, rules, stage1=stage1)
    resolve(rules, variables)  # 'stem|stage1_conv\d+' is one rule: no error when stage 1 has only the stem
    assert _quantized_layers(variables) == ["stage2_conv1", "stage3_conv1"]
    assert _levels(inter, "stage2_conv1") <= 4


@pytest.mark.parametrize("method", ["lsq", "qkd", "interval", "pact", "dorefa"])
def test_first_last_8bit_preset(method):
    """W8A8 stem and classifier for every method; the stem's (signed) image input declared signed:
    a signed 8-bit grid (the interval method: its learnable lower bound)."""
    rules = first_last_8bit(method, 2, 2)
    variables, inter = _build(TinyResNet, rules)
    assert _quantized_layers(variables) == sorted(RESNET_LAYERS)
    resolved = resolve(rules, variables)
    assert resolved["stem"].w_bits == 8 and resolved["classifier"].a_bits == 8
    assert resolved["stem"].a_bits == 8
    assert resolved["stem"].a_signed
    assert resolved["layer1_0/conv1"].w_bits == 2
    assert _levels(inter, "stem") > 4  # 8-bit grid
    assert _levels(inter, "layer1_0/conv2") <= 4
    assert _levels(inter, "classifier") > 4


def test_first_match_wins():
    rules = rule_set(
        Rule(pattern="layer1_0/conv1", method="lsq", w_bits=4, a_bits=4),
        Rule(pattern="layer1_0/.*", method="dorefa", w_bits=2, a_bits=2),
        Rule(pattern=".*", fp=True),
    )
    variables, inter = _build(TinyResNet, rules)
    assert sorted(variables["params"]["layer1_0"]["conv1"]["quant"]) == ["a_step", "w_step"]
    assert "quant" not in variables["params"]["layer1_0"]["conv2"]  # DoReFa: no parameters ...
    assert sorted(variables["quant_delta"]["layer1_0"]["conv2"]) == ["a", "w"]  # ... but quantized
    assert _quantized_layers(variables) == ["layer1_0/conv1", "layer1_0/conv2"]
    assert _levels(inter, "layer1_0/conv2") <= 4
    r = resolve(rules, variables)
    assert (r["layer1_0/conv1"].rule, r["layer1_0/conv2"].rule, r["stem"].rule) == (0, 1, 2)


def test_unmatched_rule_raises():
    params = jax.eval_shape(TinyResNet().init, KEY(0), X)
    with pytest.raises(ValueError, match="'layer9.*' matched no layer"):
        resolve(rule_set(Rule(pattern="stem", fp=True), Rule(pattern="layer9.*", method="lsq", w_bits=2)), params)
    with pytest.raises(ValueError, match="#1 'stem' matched no layer"):  # shadowed by '.*'
        resolve(rule_set(Rule(pattern=".*", method="lsq", w_bits=2), Rule(pattern="stem", fp=True)), params)
    # a layer no rule matches is full precision, and shows in the report
    text = describe(rule_set(Rule(pattern="stem", method="dorefa", w_bits=2, a_bits=2)), params)
    assert "no rule" in text and "1 of 5 layers quantized" in text


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="lsq", w_bits=0, a_bits=2), "w_bits"),
        (dict(method="lsq", w_bits=2, a_bits=9), "a_bits"),
        (dict(method="lsq", w_bits=2.0, a_bits=2), "w_bits"),
        (dict(method="lsq", w_bits=True, a_bits=2), "w_bits"),
        (dict(method="lsq", w_bits=2, a_bits="4"), "a_bits"),
        (dict(method="lsq"), "quantizes nothing"),
        (dict(method="ewgs", w_bits=2, a_bits=2), "method must be one of"),
        (dict(fp=True, w_bits=2), "drop the bits"),
        (dict(method="lsq", fp=True), "contradicts"),
        (dict(method="lsq", w_bits=2, a_bits=2, pact_alpha=3.0), "pact_alpha"),
    ],
)
def test_invalid_rules_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Rule(pattern=".*", **kwargs)


def test_bad_regex_and_ruleset_contents():
    with pytest.raises(ValueError, match="regex"):
        Rule(pattern="layer[", fp=True)
    with pytest.raises(ValueError, match="Rule objects"):
        RuleSet(rules=("stem",))
    with pytest.raises(TypeError):
        Rule(".*", "lsq", 2, 2)  # keyword-only


def test_separate_bits_and_hashable():
    rules = sqakd_cifar("lsq", 1, 8)
    lp = rules.match("layer1_0/conv1")
    assert (lp.w_bits, lp.a_bits) == (1, 8)
    assert hash(rules) == hash(sqakd_cifar("lsq", 1, 8))  # usable as a static module attribute


def test_report_and_paths():
    variables, _ = _build(TinyResNet, sqakd_cifar("interval", 2, 2))
    assert quantizable_paths(variables["params"]) == sorted(RESNET_LAYERS)  # jit returns sorted dicts
    assert quantizable_paths(RESNET_LAYERS) == RESNET_LAYERS
    text = describe(sqakd_cifar("interval", 2, 2), variables)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "method", "W", "A", "input", "rule"]
    row = next(line for line in lines if line.startswith("layer1_0/conv2"))
    assert row.split()[:5] == ["layer1_0/conv2", "interval", "2", "2", "offset"]
    assert next(line for line in lines if line.startswith("stem")).split()[1:5] == ["fp", "-", "-", "-"]
    assert lines[-1] == "3 of 5 layers quantized"
    assert describe(full_precision(), RESNET_LAYERS).endswith("0 of 5 layers quantized")


@pytest.mark.parametrize("method", ["lsq", "qkd", "pact", "dorefa"])
def test_declared_signed_inputs_get_a_signed_grid(method):
    """with_signed_inputs: declared layers get a_signed=True whatever their rule says (FP layers
    stay FP), the others keep an unsigned grid, and the report shows both."""
    rules = with_signed_inputs(uniform(method, 4, 4), "stem|layer1_0/conv2")
    resolved = resolve(rules, RESNET_LAYERS)
    assert {p for p, lp in resolved.items() if lp.a_signed} == {"stem", "layer1_0/conv2"}
    grid = {line.split()[0]: line.split()[4] for line in describe(rules, RESNET_LAYERS).splitlines()[2:-1]}
    assert grid == {"stem": "signed", "layer1_0/conv1": "unsigned", "layer1_0/conv2": "signed",
                    "layer2_0_conv": "unsigned", "classifier": "unsigned"}
    fp_stem = with_signed_inputs(sqakd_cifar(method, 4, 4), "stem|layer1_0/conv2")
    assert not resolve(fp_stem, RESNET_LAYERS)["stem"].quantized
    assert resolve(fp_stem, RESNET_LAYERS)["layer1_0/conv2"].a_signed


def test_signed_input_declaration_errors():
    with pytest.raises(ValueError, match="'layer9.*' matched no layer.*registry"):
        resolve(with_signed_inputs(uniform("lsq", 4, 4), "layer9.*"), RESNET_LAYERS)
    with pytest.raises(ValueError, match="not a valid regex"):
        with_signed_inputs(uniform("lsq", 4, 4), "stem[")


def test_layer_path_is_module_path():
    """QConv matches its rule against '/'.join(self.path), nested blocks included."""
    seen = []

    class Spy(RuleSet):
        def match(self, path):
            seen.append(path)
            return super().match(path)

    conv, dense = quantized_layers(Spy(rules=(Rule(pattern=".*", fp=True),)))
    TinyResNet(conv=conv, dense=dense).init(KEY(0), jnp.zeros((1, 8, 8, 3)))
    assert sorted(set(seen)) == sorted(RESNET_LAYERS)
