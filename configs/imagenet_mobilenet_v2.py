r"""ImageNet MobileNetV2: QKD (and EWGS QAT / SQAKD) for QKD's depthwise-convolution study.

Recipes: docs/method.md section 8 (ImageNet). Every conv and linear layer is quantized, depthwise
convs included, the first and the last at 8 bits (preset 'first_last_8bit').

ARG (after the colon; default 'qkd,w4a4'):
  fp                 FP teacher only (torchvision's MobileNetV2 recipe: SGD 0.045, momentum 0.9,
                     wd 4e-5, batch 256, 300 epochs, lr x 0.98 every epoch).
  qkd,wBaB           QKD ('qkd' quantizer, T 2): teacher -> calibrate -> self_study (15 epochs, CE)
                     -> co_study (50 epochs, teacher trained too) -> tutoring (35 epochs, frozen
                     co-studied teacher).
  qat,wBaB / sqakd,wBaB  EWGS QAT / SQAKD ('interval' quantizer), 100 epochs.
  B in 1..8; paper settings W4A4 and W6A6 (QKD abstract), W5A5 our choice; a method token
  overrides the quantizer.
Sources: bit widths W4A4 / W6A6 from the QKD paper; everything else is our choice, as for the
ResNet ImageNet QKD configs: the EWGS ImageNet student recipe in every phase (SGD 1e-2, momentum 0.9,
coupled wd 1e-4 for the weights, Adam 1e-5 for the quantizer parameters, batch 256, cosine per epoch)
and QKD's CIFAR split 30/100/70 scaled to 100 epochs; the paper's MobileNetV2 epochs and learning
rates were not checked here.

Teacher: start from torchvision's pretrained MobileNetV2 (as the papers do):
  python -m qkd_jax.import_teacher --weights=mobilenet_v2-b0353104.pth --model=mobilenet_v2 \
    --out=/tmp/in_mbv2_teacher --config=configs/imagenet_mobilenet_v2.py:qkd,w4a4
Run:
  for b in w4a4 w5a5 w6a6; do
    python -m qkd_jax.main --config=configs/imagenet_mobilenet_v2.py:qkd,$b --workdir=/tmp/in_mbv2_qkd_$b \
      --config.teacher_checkpoint=/tmp/in_mbv2_teacher
  done
"""

from qkd_jax.run import recipes as common

# The paper's settings (each is a valid ARG; other bit widths are accepted too).
VARIANTS = common.IMAGENET_DEPTHWISE_VARIANTS


def get_config(arg: str = ""):
    return common.imagenet_config(common.imagenet_variant(arg, VARIANTS), model="mobilenet_v2",
                                  teacher=common.torchvision_mobilenet_v2_teacher())
