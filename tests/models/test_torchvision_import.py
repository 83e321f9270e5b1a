"""torchvision state_dicts -> zoo flax variables, and the weight-file readers.

Without torch: key layout and sizes against facts read off torchvision 0.28's models, hand-built
state_dicts in that layout, the OIHW -> HWIO conv layout against a direct convolution, error
messages, and a safetensors file written byte by byte here. With torch and torchvision: every
ImageNet-style zoo model gives torchvision's eval-mode logits for random weights and random
BatchNorm statistics (skipped with the reason when they are not importable).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import struct
import sys
import types
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qkd_jax.models import export_torchvision, get_model, import_torchvision, load_weights
from qkd_jax.models.layers import conv_layer
from qkd_jax.models.torchvision_import import (
    flax_to_torch,
    supported_models,
    torch_to_flax,
    torchvision_shapes,
)
from tests.x64 import enable_x64

# (state_dict entries, elements incl. one per num_batches_tracked) of torchvision 0.28's
# models with 1000 classes: len(sd) and sum(v.numel() for v in sd.values()).
TORCHVISION_STATE_DICT_SIZES = {
    "resnet18": (122, 11_699_132),
    "resnet34": (218, 21_814_732),
    "resnet50": (320, 25_610_205),
    "vgg11_bn": (62, 132_874_352),
    "mobilenet_v2": (314, 3_539_036),
    "shufflenet_v2_x0_5": (338, 1_374_800),
    "shufflenet_v2_x1_0": (338, 2_294_840),
    "squeezenet1_0": (52, 1_248_424),
    "efficientnet_b0": (360, 5_330_613),
}

# A sample of torchvision 0.28's keys and shapes (1000 classes).
TORCHVISION_KEYS = {
    "resnet18": {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "bn1.num_batches_tracked": (),
        "layer1.0.conv1.weight": (64, 64, 3, 3),
        "layer2.0.downsample.0.weight": (128, 64, 1, 1),
        "layer2.0.downsample.1.running_mean": (128,),
        "layer4.1.bn2.running_var": (512,),
        "fc.weight": (1000, 512),
        "fc.bias": (1000,),
    },
    "resnet50": {"layer1.0.conv3.weight": (256, 64, 1, 1), "layer4.2.bn3.weight": (2048,), "fc.weight": (1000, 2048)},
    "mobilenet_v2": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.0.1.running_mean": (32,),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.running_var": (16,),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.1.0.weight": (96, 1, 3, 3),
        "features.2.conv.2.weight": (24, 96, 1, 1),
        "features.2.conv.3.bias": (24,),
        "features.18.0.weight": (1280, 320, 1, 1),
        "features.18.1.num_batches_tracked": (),
        "classifier.1.weight": (1000, 1280),
    },
    "efficientnet_b0": {
        "features.1.0.block.0.0.weight": (32, 1, 3, 3),
        "features.1.0.block.1.fc1.weight": (8, 32, 1, 1),
        "features.1.0.block.2.0.weight": (16, 32, 1, 1),
        "features.2.0.block.2.fc2.bias": (96,),
        "features.3.0.block.1.0.weight": (144, 1, 5, 5),
        "features.8.1.running_var": (1280,),
        "classifier.1.weight": (1000, 1280),
    },
    "shufflenet_v2_x0_5": {
        "conv1.0.weight": (24, 3, 3, 3),
        "stage2.0.branch1.0.weight": (24, 1, 3, 3),
        "stage2.0.branch1.2.weight": (24, 24, 1, 1),
        "stage2.1.branch2.0.weight": (24, 24, 1, 1),
        "stage2.1.branch2.3.weight": (24, 1, 3, 3),
        "conv5.1.running_var": (1024,),
        "fc.weight": (1000, 1024),
    },
    "vgg11_bn": {
        "features.0.weight": (64, 3, 3, 3),
        "features.1.running_mean": (64,),
        "features.4.weight": (128, 64, 3, 3),
        "features.26.bias": (512,),
        "classifier.0.weight": (4096, 25088),
        "classifier.6.weight": (1000, 4096),
    },
    "squeezenet1_0": {
        "features.0.weight": (96, 3, 7, 7),
        "features.3.expand3x3.weight": (64, 16, 3, 3),
        "features.12.squeeze.weight": (64, 512, 1, 1),
        "classifier.1.weight": (1000, 512, 1, 1),
    },
}


def random_state_dict(name: str, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A hand-built torchvision-layout state_dict: random float32 values, positive running_var."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for key, shape in torchvision_shapes(name, num_classes).items():
        if key.endswith("num_batches_tracked"):
            out[key] = np.asarray(7, np.int64)
        elif key.endswith("running_var"):
            out[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            out[key] = rng.normal(size=shape).astype(np.float32)
    return out


# ----------------------------------------------------------------------------- without torch


def test_supported_models_are_the_imagenet_zoo() -> None:
    assert supported_models() == sorted(TORCHVISION_STATE_DICT_SIZES)


@pytest.mark.parametrize("name", sorted(TORCHVISION_STATE_DICT_SIZES))
def test_expected_layout_matches_torchvision(name: str) -> None:
    shapes = torchvision_shapes(name)
    entries, elements = TORCHVISION_STATE_DICT_SIZES[name]
    assert len(shapes) == entries
    assert sum(math.prod(s) for s in shapes.values()) == elements
    for key, shape in TORCHVISION_KEYS.get(name, {}).items():
        assert shapes.get(key) == shape, key


def test_classes_follow_the_classifier() -> None:
    assert torchvision_shapes("squeezenet1_0", 37)["classifier.1.weight"] == (37, 512, 1, 1)
    assert torchvision_shapes("vgg11_bn", 37)["classifier.6.bias"] == (37,)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_hand_built_state_dict_lands_on_the_right_variables(name: str) -> None:
    sd = random_state_dict(name, 37)
    variables = import_torchvision(name, sd)
    params, stats = variables["params"], variables["batch_stats"]
    if name == "resnet18":
        checks = [
            (params["stem"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)),
            (params["stem_bn"]["scale"], sd["bn1.weight"]),
            (params["stem_bn"]["bias"], sd["bn1.bias"]),
            (stats["stem_bn"]["mean"], sd["bn1.running_mean"]),
            (stats["stem_bn"]["var"], sd["bn1.running_var"]),
            (params["layer3_0"]["downsample_conv"]["kernel"], sd["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0)),
            (stats["layer4_1"]["bn2"]["var"], sd["layer4.1.bn2.running_var"]),
            (params["classifier"]["kernel"], sd["fc.weight"].T),
            (params["classifier"]["bias"], sd["fc.bias"]),
        ]
    else:
        checks = [
            (params["block1"]["dw"]["kernel"], sd["features.1.conv.0.0.weight"].transpose(2, 3, 1, 0)),
            (params["block1"]["project"]["kernel"], sd["features.1.conv.1.weight"].transpose(2, 3, 1, 0)),
            (stats["block1"]["project_bn"]["mean"], sd["features.1.conv.2.running_mean"]),
            (params["block2"]["expand"]["kernel"], sd["features.2.conv.0.0.weight"].transpose(2, 3, 1, 0)),
            (params["block2"]["dw"]["kernel"], sd["features.2.conv.1.0.weight"].transpose(2, 3, 1, 0)),
            (params["block2"]["project_bn"]["scale"], sd["features.2.conv.3.weight"]),
            (stats["head_bn"]["var"], sd["features.18.1.running_var"]),
            (params["classifier"]["kernel"], sd["classifier.1.weight"].T),
        ]
    for got, want in checks:
        assert got.shape == want.shape and got.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(got), want)
    # Exactly the model's variables (num_classes read from the classifier) ...
    shapes = jax.eval_shape(get_model(name, 37).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    assert jax.tree.map(lambda a: a.shape, variables) == jax.tree.map(lambda a: a.shape, shapes)
    # ... and every tensor goes back where it came from (num_batches_tracked is reset to 0).
    back = export_torchvision(name, variables)
    assert sorted(back) == sorted(sd)
    for key, value in sd.items():
        want = np.zeros((), np.int64) if key.endswith("num_batches_tracked") else value
        np.testing.assert_array_equal(back[key], want, err_msg=key)


def test_num_batches_tracked_is_optional() -> None:
    sd = {k: v for k, v in random_state_dict("squeezenet1_0", 10).items()}
    assert "batch_stats" not in import_torchvision("squeezenet1_0", sd)  # SqueezeNet has no BatchNorm
    sd = {k: v for k, v in random_state_dict("shufflenet_v2_x0_5", 10).items() if "num_batches" not in k}
    assert set(import_torchvision("shufflenet_v2_x0_5", sd)) == {"params", "batch_stats"}


def _direct_conv_nchw(x: np.ndarray, w: np.ndarray, groups: int, pad: int) -> np.ndarray:
    """torch.nn.functional.conv2d (stride 1) written out: out[n, o] = sum over its group's inputs."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = h + 2 * pad - kh + 1, wd + 2 * pad - kw + 1
    out = np.zeros((n, o, oh, ow), np.float64)
    per_group = o // groups
    for oc in range(o):
        g = oc // per_group
        for i in range(oh):
            for j in range(ow):
                patch = xp[:, g * cg : (g + 1) * cg, i : i + kh, j : j + kw]
                out[:, oc, i, j] = np.einsum("nchw,chw->n", patch, w[oc])
    return out


@pytest.mark.parametrize("channels,features,groups", [(3, 4, 1), (4, 6, 2), (5, 5, 5)])
def test_conv_kernel_layout_matches_torch_conv(channels: int, features: int, groups: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, channels, 5, 6)).astype(np.float32)
    w = rng.normal(size=(features, channels // groups, 3, 3)).astype(np.float32)
    want = _direct_conv_nchw(x.astype(np.float64), w.astype(np.float64), groups, 1)
    lax_nchw = jax.lax.conv_general_dilated(
        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"), feature_group_count=groups
    )
    np.testing.assert_allclose(np.asarray(lax_nchw), want, rtol=1e-5, atol=1e-5)
    conv = conv_layer(nn.Conv, features, 3, name="c", groups=groups)
    got = conv.apply({"params": {"kernel": torch_to_flax(w)}}, x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(flax_to_torch(torch_to_flax(w)), w)


def test_dense_layout_matches_torch_linear() -> None:
    rng = np.random.default_rng(2)
    x, w, b = rng.normal(size=(3, 5)), rng.normal(size=(4, 5)), rng.normal(size=(4,))
    got = nn.Dense(4).apply({"params": {"kernel": torch_to_flax(w), "bias": b}}, x)
    np.testing.assert_allclose(np.asarray(got), x @ w.T + b, rtol=1e-5, atol=1e-5)


def test_unknown_missing_and_mismatched_keys_are_named() -> None:
    sd = random_state_dict("resnet18", 10)
    sd["fc.extra"] = np.zeros(3, np.float32)
    sd["fc.num_batches_tracked"] = np.asarray(0)  # fc is no BatchNorm
    del sd["layer1.0.bn1.running_var"]
    sd["layer2.1.conv2.weight"] = np.zeros((128, 128, 1, 3), np.float32)
    with pytest.raises(ValueError) as info:
        import_torchvision("resnet18", sd)
    message = str(info.value)
    assert "unknown keys: fc.extra, fc.num_batches_tracked" in message
    assert "missing keys: layer1.0.bn1.running_var" in message
    assert "layer2.1.conv2.weight: got (128, 128, 1, 3), expected (128, 128, 3, 3)" in message


def test_long_error_lists_are_cut() -> None:
    sd = random_state_dict("resnet18", 10)
    sd = {k: v for k, v in sd.items() if not k.startswith("layer")} | {f"x{i:02d}": np.zeros(1) for i in range(25)}
    with pytest.raises(ValueError, match=r"unknown keys: x00, x01, .*x19, \.\.\. \(5 more\) \| missing keys: "):
        import_torchvision("resnet18", sd)


def test_missing_classifier_and_unknown_model_are_named() -> None:
    sd = random_state_dict("resnet18", 10)
    del sd["fc.weight"]
    with pytest.raises(ValueError, match=r"missing torchvision key 'fc.weight' \(the classifier weight"):
        import_torchvision("resnet18", sd)
    with pytest.raises(ValueError, match=r"no torchvision mapping for 'resnet20'; supported: efficientnet_b0"):
        import_torchvision("resnet20", sd)


# ----------------------------------------------------------------------------- weight files


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Upper 16 bits of float32 values (exact for values representable in bfloat16)."""
    return (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def test_safetensors_written_by_hand(tmp_path: Any) -> None:
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    f16 = np.asarray([0.5, -1.25, 65504.0], np.float16)
    bf16 = np.asarray([[1.5, -2.0], [0.15625, 3.0e38]], np.float32)
    bf16 = (_bf16_bits(bf16).astype(np.uint32) << 16).view(np.float32)  # rounded to bf16 exactly
    i64 = np.asarray(123456789012, np.int64)
    blobs = [
        ("w", "F32", f32.shape, f32.astype("<f4").tobytes()),
        ("h", "F16", f16.shape, f16.astype("<f2").tobytes()),
        ("b", "BF16", bf16.shape, _bf16_bits(bf16).astype("<u2").tobytes()),
        ("bn.num_batches_tracked", "I64", (), i64.astype("<i8").tobytes()),
    ]
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, raw in blobs:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces
    path = tmp_path / "weights.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(raw for *_, raw in blobs))

    got = load_weights(path)
    assert sorted(got) == ["b", "bn.num_batches_tracked", "h", "w"]
    np.testing.assert_array_equal(got["w"], f32)
    assert got["h"].dtype == np.float16
    np.testing.assert_array_equal(got["h"], f16)
    assert got["b"].dtype == np.float32 and got["b"].shape == (2, 2)
    np.testing.assert_array_equal(got["b"], [[1.5, -2.0], [0.15625, bf16[1, 1]]])
    assert got["bn.num_batches_tracked"].dtype == np.int64 and got["bn.num_batches_tracked"] == 123456789012

    header["w"]["dtype"] = "U8"
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(raw for *_, raw in blobs))
    with pytest.raises(ValueError, match="tensor 'w' has dtype U8"):
        load_weights(path)
    header["w"] = {"dtype": "F32", "shape": [2, 4], "data_offsets": [0, 24]}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(raw for *_, raw in blobs))
    with pytest.raises(ValueError, match=r"tensor 'w' data_offsets 0\.\.24 do not fit shape \(2, 4\)"):
        load_weights(path)


def test_npz_feeds_import(tmp_path: Any) -> None:
    sd = random_state_dict("squeezenet1_0", 10)
    np.savez(tmp_path / "sq.npz", **sd)
    variables = import_torchvision("squeezenet1_0", load_weights(tmp_path / "sq.npz"))
    np.testing.assert_array_equal(variables["params"]["fire9"]["expand3x3"]["bias"], sd["features.12.expand3x3.bias"])


def test_pth_without_torch_says_how_to_get_it(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"needs torch \(pip install torch\)"):
        load_weights(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="unknown weight file suffix '.bin'"):
        load_weights(tmp_path / "w.bin")


# ----------------------------------------------------------------------------- with torch


def torchvision_models() -> types.ModuleType:
    """``torchvision.models`` (torch and torchvision come with the test command's `.[torch]` extra:
    a missing one fails the test instead of skipping it)."""
    import torch  # noqa: F401

    if "torchvision" not in sys.modules and importlib.util.find_spec("torchvision") is None:
        raise AssertionError("torchvision is not installed (pip install -e '.[test,torch]')")
    return _import_torchvision_models()


@functools.cache
def _import_torchvision_models() -> types.ModuleType:
    """The model definitions need only torch: when the package's compiled ops do not load (a
    torchvision wheel built for another torch variant fails in its ``__init__``), the package is
    entered without running ``__init__``."""
    try:
        return importlib.import_module("torchvision.models")
    except (ImportError, RuntimeError):
        for module in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[module]
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__file__ = spec.origin
    package.__spec__ = spec
    sys.modules["torchvision"] = package
    return importlib.import_module("torchvision.models")


def randomize_(model: Any, calibration: Any, seed: int) -> None:
    """Random biases, BatchNorm affine parameters and running statistics (in place, eval mode).

    Each BatchNorm's running statistics are those of its input on ``calibration`` (in eval mode,
    layer after layer) times random factors: with torchvision's initialisation and arbitrary
    statistics, activations vanish or blow up and the logits stop depending on most weights,
    which would hide mapping errors.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def calibrate(norm: torch.nn.BatchNorm2d, inputs: tuple[torch.Tensor]) -> None:
        shape = norm.running_mean.shape
        var = inputs[0].var((0, 2, 3))
        var = var + 0.1 * var.mean()  # no near-constant channel amplifies rounding errors
        norm.running_mean.copy_(inputs[0].mean((0, 2, 3)) + 0.2 * var.sqrt() * torch.randn(shape, generator=gen))
        norm.running_var.copy_(var * (0.5 + torch.rand(shape, generator=gen)))
        norm.weight.copy_(0.5 + torch.rand(shape, generator=gen))
        norm.bias.copy_(0.2 * torch.randn(shape, generator=gen))

    model.eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and module.bias is not None:
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))
        norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        hooks = [norm.register_forward_pre_hook(calibrate) for norm in norms]
        model(calibration)
        for hook in hooks:
            hook.remove()


# Tolerances, relative to the largest |logit| of torchvision's output. Both sides evaluate the
# same function with different summation orders and conv algorithms. Evaluated in float64, they
# agree to <= 7e-14 of that scale on all nine models (float64 rounding; a mapping or structural
# error would show at O(1)), so 1e-10 checks the mapping itself. In float32 each side's error
# against the float64 result is <= 4e-5 of the scale here (ResNet-50 the largest: rounding in
# ~50 layers, amplified by BatchNorm gains); 3e-4 bounds the sum of both with a 4x margin for
# other processors and XLA/oneDNN kernels.
FLOAT32_TOLERANCE = 3e-4
FLOAT64_TOLERANCE = 1e-10


# The fast tier compares one model (ResNet-18); the other eight, up to VGG-11-BN's 132M
# parameters, run in the full tier.
FAST_LOGITS_MODEL = "resnet18"


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n == FAST_LOGITS_MODEL else pytest.mark.slow)
                                  for n in sorted(TORCHVISION_STATE_DICT_SIZES)])
def test_logits_match_torchvision(name: str) -> None:
    models = torchvision_models()
    import torch

    torch.manual_seed(0)
    reference = getattr(models, name)(num_classes=37)
    rng = np.random.default_rng(3)
    x, calibration = (rng.normal(size=(n, 3, 64, 64)).astype(np.float32) for n in (2, 4))
    randomize_(reference, torch.from_numpy(calibration), seed=1)
    state_dict = {k: v.numpy().copy() for k, v in reference.state_dict().items()}
    with torch.no_grad():
        want = reference(torch.from_numpy(x)).numpy()

    variables = import_torchvision(name, state_dict)
    got = np.asarray(jax.jit(get_model(name, 37).apply)(variables, x.transpose(0, 2, 3, 1)))
    scale = float(np.abs(want).max())
    assert got.shape == want.shape == (2, 37) and scale > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT32_TOLERANCE * scale)

    with torch.no_grad():
        want64 = reference.double()(torch.from_numpy(x).double()).numpy()
    with enable_x64(True):
        variables64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        model64 = get_model(name, 37, dtype=jnp.float64)
        got64 = np.asarray(jax.jit(model64.apply)(variables64, x.transpose(0, 2, 3, 1).astype(np.float64)))
    assert got64.dtype == want64.dtype == np.float64
    np.testing.assert_allclose(got64, want64, rtol=0, atol=FLOAT64_TOLERANCE * scale)

    # The export is accepted by torch's strict loader and reproduces every tensor.
    reference.float()
    exported = {k: torch.from_numpy(v) for k, v in export_torchvision(name, variables).items()}
    reference.load_state_dict(exported, strict=True)
    for key, value in reference.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            np.testing.assert_array_equal(value.numpy(), state_dict[key], err_msg=key)


def test_pth_file(tmp_path: Any) -> None:
    import torch

    state = {"a.weight": torch.randn(3, 2), "b.bias": torch.tensor([1.5, -0.25]).to(torch.bfloat16)}
    state["n.num_batches_tracked"] = torch.tensor(5)
    torch.save(state, tmp_path / "w.pth")
    got = load_weights(tmp_path / "w.pth")
    np.testing.assert_array_equal(got["a.weight"], state["a.weight"].numpy())
    assert got["b.bias"].dtype == np.float32
    np.testing.assert_array_equal(got["b.bias"], [1.5, -0.25])
    assert got["n.num_batches_tracked"] == 5
