r"""CIFAR-100 ResNet-32: FP teacher, EWGS QAT, EWGS + SQAKD and QKD.

Recipes: docs/method.md section 8 and the released SQAKD CIFAR scripts.

ARG (after the colon; default 'sqakd,w2a2'):
  fp            FP teacher only: SGD 0.05, momentum 0.9, wd 5e-4, batch 64,
                cosine per epoch, 720 epochs.
  qat,wBaB      EWGS QAT: teacher -> calibrate -> student, cross-entropy with labels.
  sqakd,wBaB    EWGS + SQAKD: teacher -> calibrate -> student, alpha * KL_T(student, teacher),
                T = 4, no labels (alpha 1; W4A4: alpha 100).
  qkd,wBaB      QKD ('qkd' quantizer, T = 2): teacher -> calibrate -> self_study (30 epochs,
                CE) -> co_study (100, teacher trained too) -> tutoring (70, frozen co-studied
                teacher); QKD's CIFAR schedule, this file's student recipe in every phase;
                settings W2A2, W3A3, W4A4 (docs/method.md section 8).
  squat|squat_ce,wBaB
                SQuaT (lcdbsa522/SQuaT run_cifar100_resnet32_squat.sh, docs/method.md "SQuaT"):
                teacher -> calibrate -> student with KL_4 + 1.0 * MSE(q_s, sg(q_t)) at the input of
                the last block's conv2 (the teacher's input quantized with the student's current
                bounds), no labels ('squat') or + 1.0 * CE ('squat_ce', the CIFAR script's loss
                line); the released delta refresh (quant.estimator 'hessian' every 10 epochs).
  B in 1..8; paper settings W1A1, W2A2, W4A4. The quantizer is 'interval' (EWGS / SQAKD
  learnable interval), preset 'sqakd_cifar': stem conv, BatchNorms and classifier stay FP.
Student: Adam 5e-4 with coupled L2 5e-4 (weights) + Adam 5e-6 without decay (quantizer
parameters), batch 64, cosine per epoch, 720 epochs.
EWGS gradient scaling: delta = 0 by default (the released code); --config.quant.estimator=hessian
(every 10 epochs on 3 training batches of 64, each layer's cross-entropy Hessian probed on its own,
as the released EWGS code; docs/method.md section 5) or --config.quant.estimator=ewgs
--config.quant.delta=D.

Run (train the teacher once, then every student from it):
  python -m qkd_jax.main --config=configs/cifar100_resnet32.py:fp --workdir=/tmp/c100_r32_fp
  for b in w1a1 w2a2 w4a4; do for o in qat sqakd; do
    python -m qkd_jax.main --config=configs/cifar100_resnet32.py:$o,$b --workdir=/tmp/c100_r32_${o}_$b \
      --config.teacher_checkpoint=/tmp/c100_r32_fp/teacher
  done; done
QKD from the same teacher:
  for b in w2a2 w3a3 w4a4; do
    python -m qkd_jax.main --config=configs/cifar100_resnet32.py:qkd,$b --workdir=/tmp/c100_r32_qkd_$b \
      --config.teacher_checkpoint=/tmp/c100_r32_fp/teacher
  done
or in one run (trains its own teacher first):
  python -m qkd_jax.main --config=configs/cifar100_resnet32.py:sqakd,w2a2 --workdir=/tmp/c100_r32_sqakd_w2a2
"""

from qkd_jax.run import recipes as common

# The paper's settings (each is a valid ARG; other bit widths are accepted too).
VARIANTS = common.CIFAR_VARIANTS
ALPHA = {"w4a4": 100.0}  # SQAKD alpha by bits where it is not 1


def get_config(arg: str = ""):
    v = common.cifar_variant(arg, VARIANTS, squat=True)
    return common.cifar_config(v, dataset="cifar100", model="resnet32", preset="sqakd_cifar", epochs=720,
                               alpha=ALPHA.get(f"w{v.w_bits}a{v.a_bits}", 1.0))
