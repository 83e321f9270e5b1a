r"""Tiny-ImageNet MobileNetV2: PACT / LSQ / DoReFa, each with and without SQAKD.

Recipes: docs/method.md section 8 and the released SQAKD Tiny-ImageNet scripts.

64 px images upsampled to 224 (ImageNet-style augmentation), 200 classes, 100 epochs per phase.
Quantizers (default quant.variant='released'): the released SQAKD Tiny-ImageNet (MQBench) ones,
docs/method.md section 9: signed symmetric grids [-2^(b-1), 2^(b-1) - 1] for every weight and
activation; PACT with alpha fixed at 6 (scale 12 / (2^b - 1)), DoReFa (tanh / max) weights; LSQ;
DoReFa tanh / max normalisation for weights and activations. Preset 'mqbench_academic': 'stem' and
'classifier' are the released 32-bit layers (PACT / DoReFa transforms only, LSQ full precision),
every other conv and linear quantized; calibration on full-precision inputs; quantizer parameters
under the student's weight decay. The textbook quantizers of docs/method.md section 2 instead:
  --config.quant.variant=textbook --config.quant.preset=first_last_8bit

ARG (after the colon; default 'sqakd,pact,w4a4'):
  fp                    FP teacher only (trained from scratch, label smoothing 0.1).
  [qat,]METHOD,wBaB     plain QAT: teacher -> calibrate -> student, cross-entropy with label
                        smoothing 0.1 ('pact,w4a4' is the same as 'qat,pact,w4a4').
  sqakd,METHOD,wBaB     SQAKD: teacher -> calibrate -> student, alpha * KL_T, T = 4, no labels.
  METHOD in pact, lsq, dorefa; B in 2..8 (textbook variant: 1..8), paper settings W3A3, W4A4, W8A8.
Optimizer (released SQAKD Tiny-ImageNet scripts): SGD nesterov, momentum 0.9, linear warmup from
1e-4 over 2500 iterations then cosine per iteration; student lr 5e-4 / wd 5e-4 (W3A3: 4e-3 / 1e-4),
quantizer parameters the same SGD and decay (textbook variant: no decay). Teacher: lr 4e-3, wd 1e-4, batch 64.
Student batch 64 (PACT) / 32 (LSQ, DoReFa), as the released runs. SQAKD alpha: W3A3 10;
W4A4 100; W8A8 100 (LSQ 300).

Run (train the teacher once, then every student from it):
  python -m qkd_jax.main --config=configs/tiny_imagenet_mobilenet_v2.py:fp --workdir=/tmp/ti_mbv2_fp
  for o in qat sqakd; do for m in pact lsq dorefa; do for b in w3a3 w4a4 w8a8; do
    python -m qkd_jax.main --config=configs/tiny_imagenet_mobilenet_v2.py:$o,$m,$b \
      --workdir=/tmp/ti_mbv2_${o}_${m}_$b \
      --config.teacher_checkpoint=/tmp/ti_mbv2_fp/teacher
  done; done; done
"""

from qkd_jax.run import recipes as common

# The paper's settings (each is a valid ARG; other bit widths are accepted too).
VARIANTS = common.TINY_IMAGENET_VARIANTS


def get_config(arg: str = ""):
    return common.tiny_imagenet_config(common.tiny_imagenet_variant(arg, VARIANTS), model="mobilenet_v2")
