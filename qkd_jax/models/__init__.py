"""Model zoo written once with conv / dense injection (FP teacher and quantized student share paths).

CIFAR: resnet20/32/56, vgg8/11/13. ImageNet-style: resnet18/34/50, vgg11_bn, mobilenet_v2,
shufflenet_v2_x0_5/x1_0, squeezenet1_0, efficientnet_b0. Released SQAKD Tiny-ImageNet VGG-11-BN
(CIFAR-style, no FC layers): vgg11_bn_tiny. See :func:`get_model`; the
distillation features of any of them: :func:`apply_with_features`.
Pretrained ImageNet-style teachers: :func:`import_torchvision` (weights read by :func:`load_weights`).
"""

from qkd_jax.models.cifar_resnet import CifarResNet, option_a_shortcut
from qkd_jax.models.cifar_vgg import CifarVGG
from qkd_jax.models.efficientnet import EfficientNet
from qkd_jax.models.features import apply_with_features, read_features
from qkd_jax.models.layers import FEATURES, BatchNorm, ModuleDef
from qkd_jax.models.mobilenet_v2 import MobileNetV2
from qkd_jax.models.registry import get_model, image_size, list_models, signed_inputs
from qkd_jax.models.resnet import ResNet
from qkd_jax.models.shufflenet_v2 import ShuffleNetV2
from qkd_jax.models.squeezenet import SqueezeNet
from qkd_jax.models.torchvision_import import export_torchvision, import_torchvision, torchvision_num_classes
from qkd_jax.models.transfer import copy_teacher_to_student
from qkd_jax.models.vgg import VGG
from qkd_jax.models.weight_files import load_weights

__all__ = [
    "FEATURES",
    "BatchNorm",
    "CifarResNet",
    "CifarVGG",
    "EfficientNet",
    "MobileNetV2",
    "ModuleDef",
    "ResNet",
    "ShuffleNetV2",
    "SqueezeNet",
    "VGG",
    "apply_with_features",
    "copy_teacher_to_student",
    "export_torchvision",
    "get_model",
    "image_size",
    "import_torchvision",
    "list_models",
    "signed_inputs",
    "load_weights",
    "option_a_shortcut",
    "read_features",
    "torchvision_num_classes",
]
