r"""CIFAR-10 ResNet-20: FP teacher, EWGS QAT, EWGS + SQAKD and QKD.

Recipes: docs/method.md section 8 and the released SQAKD CIFAR scripts.

ARG (after the colon; default 'sqakd,w2a2'):
  fp            FP teacher only: SGD 0.1, momentum 0.9, wd 1e-4, batch 256,
                cosine per epoch, 1200 epochs.
  qat,wBaB      EWGS QAT: teacher -> calibrate -> student, cross-entropy with labels.
  sqakd,wBaB    EWGS + SQAKD: teacher -> calibrate -> student, alpha * KL_T(student, teacher),
                T = 4, no labels (alpha 1).
  qkd,wBaB      QKD ('qkd' quantizer, T = 2): teacher -> calibrate -> self_study (30 epochs,
                CE) -> co_study (100, teacher trained too) -> tutoring (70, frozen co-studied
                teacher); QKD's CIFAR schedule, this file's student recipe in every phase;
                settings W2A2, W3A3, W4A4 (docs/method.md section 8).
  at|nst|sp|rkd|crd|fitnet|cc|vid|cktf,wBaB
                feature-distillation baselines (released CIFAR/scripts/run_cifar10_resnet20_EWGS+KDs.sh):
                teacher -> calibrate -> student with gamma * CE + beta * L_feature, gamma 1,
                alpha 0 (no logit KL); AT beta 1000, NST 50, SP 3000, RKD 1, CRD 0.8,
                FitNet 100, CC 0.02, VID 1; CKTF (released 'crdst') beta 1 on the embedding
                CRD + theta 0.8 on the stem and stage CRDs, nce_k 4096 (recipes.FEATURE_OPTIONS)
                (recipes.FEATURE_BASELINES); the script's setting is W2A2. The script
                passes --use_hessian True, but the released train_quant.py only prints
                there, so its delta stays 0: the default STE is what it ran
                (--config.quant.estimator=hessian is the EWGS paper's refresh, docs/method.md
                section 5).
  ft|fsp,wBaB   the two-phase baselines (released utils_distill.init, 30 epochs, SGD lr 0.01 (the released value for CIFAR ResNets),
                momentum 0.9, the student's weight decay, constant): 'ft' trains a 'paraphraser'
                phase on the teacher's feats[-2], then the student with FT beta 200 and that
                paraphraser frozen (aux_from); 'fsp' trains 'fsp_init' (FSP losses only, the
                classifier frozen), then the student with plain CE (docs/method.md section 7).
  squat|squat_ce,wBaB
                SQuaT (lcdbsa522/SQuaT, docs/method.md "SQuaT"): teacher -> calibrate -> student with
                KL_4(student, teacher) + 1.0 * MSE(q_s, sg(q_t)), q_s the student's quantized input of
                the last block's conv2 in [0, 1] codes, q_t the teacher's same input quantized with
                the student's current interval bounds; no labels ('squat', the paper's label-free
                claim) or + 1.0 * CE ('squat_ce', the CIFAR script's loss line). The released delta
                refresh: quant.estimator 'hessian' every 10 epochs on the phase's KL
                (--config.quant.estimator=ste for SQAKD's delta 0); --config.phases.student.feature_options.distance=l1
                for the L1 distance.
  B in 1..8; paper settings W1A1, W2A2, W4A4. The quantizer is 'interval' (EWGS / SQAKD
  learnable interval), preset 'sqakd_cifar': stem conv, BatchNorms and classifier stay FP.
Student: Adam 1e-3 with coupled L2 1e-4 (weights) + Adam 1e-5 without decay (quantizer
parameters), batch 256, cosine per epoch, 1200 epochs.
EWGS gradient scaling: delta = 0 by default (the released code); --config.quant.estimator=hessian
(every 10 epochs on 3 training batches of 256, each layer's cross-entropy Hessian probed on its own,
as the released EWGS code; docs/method.md section 5) or --config.quant.estimator=ewgs
--config.quant.delta=D.

Run (train the teacher once, then every student from it):
  python -m qkd_jax.main --config=configs/cifar10_resnet20.py:fp --workdir=/tmp/c10_r20_fp
  for b in w1a1 w2a2 w4a4; do for o in qat sqakd; do
    python -m qkd_jax.main --config=configs/cifar10_resnet20.py:$o,$b --workdir=/tmp/c10_r20_${o}_$b \
      --config.teacher_checkpoint=/tmp/c10_r20_fp/teacher
  done; done
QKD from the same teacher:
  for b in w2a2 w3a3 w4a4; do
    python -m qkd_jax.main --config=configs/cifar10_resnet20.py:qkd,$b --workdir=/tmp/c10_r20_qkd_$b \
      --config.teacher_checkpoint=/tmp/c10_r20_fp/teacher
  done
Feature-distillation baselines from the same teacher:
  for m in at nst sp rkd crd fitnet cc vid cktf; do
    python -m qkd_jax.main --config=configs/cifar10_resnet20.py:$m,w2a2 --workdir=/tmp/c10_r20_${m}_w2a2 \
      --config.teacher_checkpoint=/tmp/c10_r20_fp/teacher
  done
or in one run (trains its own teacher first):
  python -m qkd_jax.main --config=configs/cifar10_resnet20.py:sqakd,w2a2 --workdir=/tmp/c10_r20_sqakd_w2a2
"""

from qkd_jax.run import recipes as common

# The paper's settings (each is a valid ARG; other bit widths are accepted too).
VARIANTS = common.CIFAR10_RESNET20_VARIANTS


def get_config(arg: str = ""):
    v = common.cifar_variant(arg, VARIANTS, features=True, squat=True)
    return common.cifar_config(v, dataset="cifar10", model="resnet20", preset="sqakd_cifar", epochs=1200,
                               alpha=1.0)
