"""Parameter counts of every registry model against published / hand-derived numbers.

Only the ``params`` collection is counted (torch counts exclude BN running statistics).
Models are traced with ``jax.eval_shape``: nothing is compiled or allocated.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

from qkd_jax.models import get_model, list_models


def count_params(name: str, num_classes: int, size: int) -> int:
    model = get_model(name, num_classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32))
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes["params"]))


# torchvision (ImageNet, 1000 classes, counted at 224x224).
TORCHVISION = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "vgg11_bn": 132_868_840,
    "mobilenet_v2": 3_504_872,
    "shufflenet_v2_x0_5": 1_366_792,
    "shufflenet_v2_x1_0": 2_278_604,
    "squeezenet1_0": 1_248_424,
    "efficientnet_b0": 5_288_548,
}


def cifar_resnet_count(n: int, c: int) -> int:
    """Hand formula, EWGS/SQAKD layout with n blocks per stage and c classes.

    convs (no bias): stem 3*16*9; stage 1: 2n convs 16->16; stage 2: one 16->32 and 2n-1 32->32;
    stage 3: one 32->64 and 2n-1 64->64 (option-A shortcuts have no parameters).
    BN (scale + bias): stem 16, two per block (16, 32, 64 channels), BatchNorm1d(64).
    Linear 64 -> c with bias.
    """
    convs = 9 * (3 * 16 + 2 * n * 16 * 16 + 16 * 32 + (2 * n - 1) * 32 * 32 + 32 * 64 + (2 * n - 1) * 64 * 64)
    bns = 2 * (16 + 2 * n * (16 + 32 + 64) + 64)
    return convs + bns + 64 * c + c


def cifar_vgg_count(widths: list[int], c: int) -> int:
    """Hand formula: sum over 3x3 convs (in -> out) of 9*in*out + out (bias) + 2*out (BN), then 512*c + c."""
    ins = [3] + widths[:-1]
    return sum(9 * i * o + 3 * o for i, o in zip(ins, widths)) + 512 * c + c


# (name, classes, exact count derived by hand, the same from the formula).
CIFAR = [
    # ResNet-20, n=3: convs 267,696 + BN 1,504 (incl. BN1d 128) + Linear 650 (= the official code's 269,850).
    ("resnet20", 10, 269_850, cifar_resnet_count(3, 10)),
    # ResNet-32, n=5, CIFAR-100: convs 461,232 + BN 2,400 + Linear 6,500.
    ("resnet32", 100, 470_132, cifar_resnet_count(5, 100)),
    # ResNet-56, n=9: convs 848,304 + BN 4,192 + Linear 650.
    ("resnet56", 10, 853_146, cifar_resnet_count(9, 10)),
    # VGG-8 ('S' = 64,128,256,512,512): 1,920 + 74,112 + 295,680 + 1,181,184 + 2,360,832 + Linear 5,130.
    ("vgg8", 10, 3_918_858, cifar_vgg_count([64, 128, 256, 512, 512], 10)),
    # VGG-11 ('A'): 64,128,256,256,512,512,512,512 -> convs+BN 9,225,984 + Linear 5,130.
    ("vgg11", 10, 9_231_114, cifar_vgg_count([64, 128, 256, 256, 512, 512, 512, 512], 10)),
    # VGG-13 ('B'), CIFAR-100: 64,64,128,128,256,256,512,512,512,512 -> 9,410,880 + Linear 51,300.
    ("vgg13", 100, 9_462_180, cifar_vgg_count([64, 64, 128, 128, 256, 256, 512, 512, 512, 512], 100)),
]


# The released SQAKD Tiny-ImageNet VGG-11-BN (TinyImageNet/models/vgg.py, cfg 'A', vgg11_bn):
# VGGBlock = Conv2d(in, out, 3, padding=1) (bias=True) + BatchNorm2d(out) + ReLU, then
# Linear(512, num_classes). Its layer list, stage by stage, as written there:
RELEASED_TINY_VGG11_CFG = [[64], [128], [256, 256], [512, 512], [512, 512]]


def released_tiny_vgg11_count(c: int) -> int:
    """Closed form from the released layer list: per conv 3*3*in*out weights + out bias, per BN
    out weights + out biases; then the Linear's 512*c weights + c biases."""
    total, cin = 0, 3
    for stage in RELEASED_TINY_VGG11_CFG:
        for cout in stage:
            total += 3 * 3 * cin * cout + cout  # Conv2d with bias
            total += cout + cout  # BatchNorm2d weight and bias (running stats are buffers)
            cin = cout
    return total + 512 * c + c


def test_every_registry_model_has_a_reference_count() -> None:
    assert set(list_models()) == set(TORCHVISION) | {name for name, *_ in CIFAR} | {"vgg11_bn_tiny"}


@pytest.mark.parametrize("size", [64, 224])
def test_tiny_imagenet_vgg11_matches_the_released_network(size: int) -> None:
    # 200 classes: 9,225,984 in convs + BN (as CIFAR VGG-11) + 102,600 in the Linear.
    assert released_tiny_vgg11_count(200) == 9_328_584
    assert count_params("vgg11_bn_tiny", 200, size) == released_tiny_vgg11_count(200)
    # torchvision's VGG-11-BN with its 25088-4096-4096 head is a different network, about 14x larger (129,591,240).
    assert count_params("vgg11_bn", 200, 224) == 129_591_240 > 13 * released_tiny_vgg11_count(200)


@pytest.mark.parametrize("name", sorted(TORCHVISION))
def test_imagenet_style_counts_match_torchvision(name: str) -> None:
    assert count_params(name, 1000, 224) == TORCHVISION[name]


@pytest.mark.parametrize("name,classes,expected,formula", CIFAR)
def test_cifar_counts_match_hand_derivation(name: str, classes: int, expected: int, formula: int) -> None:
    assert expected == formula
    assert count_params(name, classes, 32) == expected


def test_cifar_count_is_independent_of_input_size() -> None:
    # VGG-8 skips the fourth pool at 32 px and takes it at 64 px; the parameters do not change.
    assert count_params("vgg8", 10, 64) == 3_918_858
