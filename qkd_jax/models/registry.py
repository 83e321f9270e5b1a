"""Model registry: one name per architecture, built with injected conv / dense factories.

    teacher = get_model('resnet20', 10)                      # nn.Conv / nn.Dense: FP
    student = get_model('resnet20', 10, conv=qconv_factory)  # same parameter paths
    signed_inputs('mobilenet_v2')                            # regex of the layers with signed inputs
    squat_tap('resnet20')                                    # regex of SQuaT's feature tap

Signed inputs. Each model declares, from its architecture, which conv / dense layers receive
inputs with negative values (a regex fully matched against the layer path); the others receive
exactly non-negative inputs (a ReLU / ReLU6 output, or max / average pools and concatenations of
them). Quantization gives the declared layers a signed activation grid (`quant.rules.
with_signed_inputs`), calibration checks the others (`quant.calibration.UnsignedInputError`), and
tests/models/test_signed_inputs.py measures both on random networks.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax.linen as nn

from qkd_jax.models.cifar_resnet import CifarResNet
from qkd_jax.models.cifar_vgg import CifarVGG
from qkd_jax.models.efficientnet import EfficientNet
from qkd_jax.models.layers import ModuleDef
from qkd_jax.models.mobilenet_v2 import MobileNetV2
from qkd_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from qkd_jax.models.shufflenet_v2 import SHUFFLENET_V2_WIDTHS, ShuffleNetV2
from qkd_jax.models.squeezenet import SqueezeNet
from qkd_jax.models.vgg import VGG


class ModelSpec(NamedTuple):
    """How to build a registered model, the input size it was designed for, and the regex of the
    layers whose input is signed."""

    build: Callable[..., nn.Module]
    image_size: int
    signed_inputs: str = "stem"


_CIFAR, _IMAGENET = 32, 224

# Every model's stem reads the normalised (signed) image.
# CIFAR ResNets: the classifier reads head_bn, a BatchNorm1d of the pooled features.
_CIFAR_RESNET_SIGNED = "stem|classifier"
# MobileNetV2: an expand conv (blocks 2-17; block 1 has none) reads the previous block's output,
# a linear projection (BN, no activation) plus the residual; head_conv reads block 17's output.
_MOBILENET_V2_SIGNED = r"stem|block\d+/expand|head_conv"
# ShuffleNetV2: the 1x1 convs after a depthwise conv + BN with no ReLU (both branches).
_SHUFFLENET_V2_SIGNED = r"stem|stage\d+_\d+/(branch1_pw|branch2_pw2)"
# EfficientNet-B0: every input is signed: SiLU outputs (min about -0.278) feed dw, se_reduce
# (through the mean), se_expand, head pooling -> classifier; project reads a SiLU output scaled
# by the SE gate; expand and head_conv read linear projections (plus residuals).
_EFFICIENTNET_SIGNED = ".*"


_MODELS: dict[str, ModelSpec] = {
    "resnet20": ModelSpec(functools.partial(CifarResNet, depth=20), _CIFAR, _CIFAR_RESNET_SIGNED),
    "resnet32": ModelSpec(functools.partial(CifarResNet, depth=32), _CIFAR, _CIFAR_RESNET_SIGNED),
    "resnet56": ModelSpec(functools.partial(CifarResNet, depth=56), _CIFAR, _CIFAR_RESNET_SIGNED),
    "vgg8": ModelSpec(functools.partial(CifarVGG, depth=8), _CIFAR),
    "vgg11": ModelSpec(functools.partial(CifarVGG, depth=11), _CIFAR),
    "vgg13": ModelSpec(functools.partial(CifarVGG, depth=13), _CIFAR),
    "resnet18": ModelSpec(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock), _IMAGENET),
    "resnet34": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock), _IMAGENET),
    "resnet50": ModelSpec(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck), _IMAGENET),
    "vgg11_bn": ModelSpec(VGG, _IMAGENET),
    # The released SQAKD Tiny-ImageNet VGG-11-BN (TinyImageNet/models/vgg.py: VGG-A convs, no
    # pool after stage 4, global average pool, Linear(512, C)), fed 224 px there.
    "vgg11_bn_tiny": ModelSpec(functools.partial(CifarVGG, depth=11, pool_stage4_at_64=False), _IMAGENET),
    "mobilenet_v2": ModelSpec(MobileNetV2, _IMAGENET, _MOBILENET_V2_SIGNED),
    "shufflenet_v2_x0_5": ModelSpec(
        functools.partial(ShuffleNetV2, widths=SHUFFLENET_V2_WIDTHS["x0_5"]), _IMAGENET, _SHUFFLENET_V2_SIGNED
    ),
    "shufflenet_v2_x1_0": ModelSpec(
        functools.partial(ShuffleNetV2, widths=SHUFFLENET_V2_WIDTHS["x1_0"]), _IMAGENET, _SHUFFLENET_V2_SIGNED
    ),
    "squeezenet1_0": ModelSpec(SqueezeNet, _IMAGENET),
    "efficientnet_b0": ModelSpec(EfficientNet, _IMAGENET, _EFFICIENTNET_SIGNED),
}


# SQuaT's feature tap (qkd_jax.distill.squat_feature): the input of the last conv of the last residual block,
# the layer the released code taps (lcdbsa522/SQuaT CIFAR/ResNet/models/custom_models_resnet.py
# `layer3[-1].conv2`, ImageNet/custom_models.py `layer4[-1].conv2`). A regex fully matched against
# layer paths; the LAST matching layer called in the forward pass is the tap. Bottleneck ResNets end
# their block with conv3 and MobileNetV2 its last inverted-residual block with the 1x1 `project`
# (our choice, by the same rule: the last conv of the last block).
_SQUAT_TAPS: dict[str, str] = {
    "resnet20": r"layer3_\d+/conv2",
    "resnet32": r"layer3_\d+/conv2",
    "resnet56": r"layer3_\d+/conv2",
    "resnet18": r"layer4_\d+/conv2",
    "resnet34": r"layer4_\d+/conv2",
    "resnet50": r"layer4_\d+/conv3",
    "mobilenet_v2": r"block\d+/project",
}


def squat_tap(name: str) -> str:
    """The SQuaT tap regex declared for model ``name`` (see ``_SQUAT_TAPS``); ValueError naming the
    fix (``feature_options.tap``) for a model that declares none."""
    _spec(name)
    if name not in _SQUAT_TAPS:
        raise ValueError(f"model {name!r} declares no SQuaT tap (declared: {sorted(_SQUAT_TAPS)}); set the "
                         f"phase's feature_options.tap to a regex of the quantized layer whose input to distil")
    return _SQUAT_TAPS[name]


def list_models() -> list[str]:
    """Names accepted by :func:`get_model`, sorted."""
    return sorted(_MODELS)


def _spec(name: str) -> ModelSpec:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    return _MODELS[name]


def image_size(name: str) -> int:
    """The input height/width the model was designed for (32 for CIFAR models, 224 otherwise)."""
    return _spec(name).image_size


def signed_inputs(name: str) -> str:
    """Regex (fully matched against layer paths) of the layers of model `name` whose input is
    signed; every other conv / dense layer's input is non-negative (see the module docstring)."""
    return _spec(name).signed_inputs


def get_model(
    name: str, num_classes: int, conv: ModuleDef = nn.Conv, dense: ModuleDef = nn.Dense, **kwargs: Any
) -> nn.Module:
    """Build model ``name`` with the given conv / dense factories; ``kwargs`` go to the module
    (e.g. ``norm``, ``dtype``, ``axis_name``, ``dropout_rate``)."""
    return _spec(name).build(num_classes=num_classes, conv=conv, dense=dense, **kwargs)
