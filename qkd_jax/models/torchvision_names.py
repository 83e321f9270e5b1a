"""torchvision's module names for the zoo's ImageNet-style models (one renaming function each).

A renaming function maps a flax module path (``('layer1_0', 'conv1')``) to torchvision's module
prefix (``'layer1.0.conv1'``). It gets the ``params`` tree too, because MobileNetV2 and
EfficientNet number the layers of a block after its optional expansion conv.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

from qkd_jax.models.cifar_vgg import cifar_vgg_names
from qkd_jax.models.efficientnet import EFFICIENTNET_B0_SETTING
from qkd_jax.models.mobilenet_v2 import MOBILENET_V2_SETTING
from qkd_jax.models.squeezenet import FIRE_SETTING, _POOL_BEFORE
from qkd_jax.models.vgg import VGG_STAGES

Path = tuple[str, ...]
#: (flax module path, the ``params`` tree) -> torchvision module prefix.
Rename = Callable[[Path, Mapping[str, Any]], str]


def _resnet(path: Path, params: Mapping[str, Any]) -> str:
    top = {"stem": "conv1", "stem_bn": "bn1", "classifier": "fc"}
    if path[0] in top:
        return top[path[0]]
    stage, block = path[0].removeprefix("layer").split("_")
    inner = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}.get(path[1], path[1])
    return f"layer{stage}.{block}.{inner}"


@functools.cache
def _vgg_names() -> dict[str, str]:
    """VGG-A with BN: each conv is features[i], its BN features[i + 1], then ReLU; a pool ends each stage."""
    names, index = {"fc1": "classifier.0", "fc2": "classifier.3", "classifier": "classifier.6"}, 0
    for i, stage in enumerate(VGG_STAGES["A"], start=1):
        for j in range(1, len(stage) + 1):
            conv, bn = cifar_vgg_names(i, j)
            names[conv], names[bn] = f"features.{index}", f"features.{index + 1}"
            index += 3
        index += 1
    return names


def _vgg(path: Path, params: Mapping[str, Any]) -> str:
    return _vgg_names()[path[0]]


def _expand_offset(path: Path, params: Mapping[str, Any]) -> int:
    """1 when the block has an expansion conv (torchvision then numbers its later layers one higher)."""
    return int("expand" in params.get(path[0], {}))


def _mobilenet_v2(path: Path, params: Mapping[str, Any]) -> str:
    head = sum(n for _, _, n, _ in MOBILENET_V2_SETTING) + 1
    top = {
        "stem": "features.0.0",
        "stem_bn": "features.0.1",
        "head_conv": f"features.{head}.0",
        "head_bn": f"features.{head}.1",
        "classifier": "classifier.1",
    }
    if path[0] in top:
        return top[path[0]]
    o = _expand_offset(path, params)
    inner = {
        "expand": "conv.0.0",
        "expand_bn": "conv.0.1",
        "dw": f"conv.{o}.0",
        "dw_bn": f"conv.{o}.1",
        "project": f"conv.{o + 1}",
        "project_bn": f"conv.{o + 2}",
    }[path[1]]
    return f"features.{path[0].removeprefix('block')}.{inner}"


_SHUFFLE_UNIT = {
    "branch1_dw": "branch1.0",
    "branch1_dw_bn": "branch1.1",
    "branch1_pw": "branch1.2",
    "branch1_pw_bn": "branch1.3",
    "branch2_pw1": "branch2.0",
    "branch2_pw1_bn": "branch2.1",
    "branch2_dw": "branch2.3",
    "branch2_dw_bn": "branch2.4",
    "branch2_pw2": "branch2.5",
    "branch2_pw2_bn": "branch2.6",
}


def _shufflenet_v2(path: Path, params: Mapping[str, Any]) -> str:
    top = {"stem": "conv1.0", "stem_bn": "conv1.1", "conv5": "conv5.0", "conv5_bn": "conv5.1", "classifier": "fc"}
    if path[0] in top:
        return top[path[0]]
    stage, unit = path[0].removeprefix("stage").split("_")
    return f"stage{stage}.{unit}.{_SHUFFLE_UNIT[path[1]]}"


@functools.cache
def _squeezenet_names() -> dict[str, str]:
    """features: conv, ReLU, then fire modules with a max pool before fire2, fire5 and fire9."""
    names, index = {"stem": "features.0", "classifier": "classifier.1"}, 2
    for k in range(2, 2 + len(FIRE_SETTING)):
        index += k in _POOL_BEFORE
        names[f"fire{k}"] = f"features.{index}"
        index += 1
    return names


def _squeezenet(path: Path, params: Mapping[str, Any]) -> str:
    return ".".join([_squeezenet_names()[path[0]], *path[1:]])


def _efficientnet(path: Path, params: Mapping[str, Any]) -> str:
    head = len(EFFICIENTNET_B0_SETTING) + 1
    top = {
        "stem": "features.0.0",
        "stem_bn": "features.0.1",
        "head_conv": f"features.{head}.0",
        "head_bn": f"features.{head}.1",
        "classifier": "classifier.1",
    }
    if path[0] in top:
        return top[path[0]]
    o = _expand_offset(path, params)
    inner = {
        "expand": "0.0",
        "expand_bn": "0.1",
        "dw": f"{o}.0",
        "dw_bn": f"{o}.1",
        "se_reduce": f"{o + 1}.fc1",
        "se_expand": f"{o + 1}.fc2",
        "project": f"{o + 2}.0",
        "project_bn": f"{o + 2}.1",
    }[path[1]]
    stage, block = path[0].removeprefix("stage").split("_")
    return f"features.{stage}.{block}.block.{inner}"


RENAMES: dict[str, Rename] = {
    "resnet18": _resnet,
    "resnet34": _resnet,
    "resnet50": _resnet,
    "vgg11_bn": _vgg,
    "mobilenet_v2": _mobilenet_v2,
    "shufflenet_v2_x0_5": _shufflenet_v2,
    "shufflenet_v2_x1_0": _shufflenet_v2,
    "squeezenet1_0": _squeezenet,
    "efficientnet_b0": _efficientnet,
}


def supported_models() -> list[str]:
    """Zoo names with a torchvision mapping (the ImageNet-style models), sorted."""
    return sorted(RENAMES)
