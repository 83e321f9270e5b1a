r"""ImageNet ResNet-18: EWGS QAT, SQAKD and QKD at W2A2 / W3A3 / W4A4 (docs/method.md sections 7 and 8).

Every conv and linear layer is quantized, the first and the last at 8 bits (preset 'first_last_8bit').

ARG (after the colon; default 'qkd,w4a4'):
  fp                 FP teacher only (torchvision recipe: SGD 0.1, momentum 0.9, wd 1e-4, batch 256,
                     90 epochs, lr / 10 at epochs 30 and 60).
  qat,wBaB           EWGS QAT: teacher -> calibrate -> student, cross-entropy ('interval' quantizer).
  sqakd,wBaB         SQAKD: teacher -> calibrate -> student, KL_T only, alpha 1, T 4 ('interval').
  qkd,wBaB           QKD ('qkd' quantizer, T 2): teacher -> calibrate -> self_study (15 epochs, CE)
                     -> co_study (50 epochs, teacher trained too) -> tutoring (35 epochs, frozen
                     co-studied teacher). QKD's CIFAR schedule 30/100/70 (200 epochs) scaled to the
                     100-epoch ImageNet budget; every phase restarts its cosine schedule.
  squat|squat_ce,wBaB SQuaT (lcdbsa522/SQuaT ImageNet/scripts/run_squat.sh, docs/method.md "SQuaT"):
                     teacher -> calibrate -> student, KL_4 + 1.0 * MSE(q_s, sg(q_t)) at the input of
                     layer4's last conv2 (the teacher's input quantized with the student's current
                     quantizer), no labels ('squat', the script's --kd_alpha 0.0) or + CE ('squat_ce');
                     batch 128 (released), the delta from the Hessian trace every epoch ('interval').
  B in 1..8, paper settings W2A2, W3A3, W4A4; a method token overrides the quantizer
  (e.g. 'sqakd,lsq,w4a4').
Student phases (EWGS ImageNet recipe): SGD 1e-2, momentum 0.9, coupled wd 1e-4 (weights) + Adam 1e-5
(quantizer parameters), batch 256, 100 epochs, cosine per epoch. The co-studied teacher uses the
weights' SGD recipe. --config.quant.estimator=hessian gives the EWGS Hessian delta (every epoch on
10 batches of 16).

Teacher: the papers start from a pretrained FP model. The 'teacher' phase of every ARG (90 epochs with
the torchvision recipe above) is replaced by torchvision's pretrained weights in two commands: import
the weights file (.pth needs torch; .safetensors and .npz do not) into a completed teacher phase, then
point the runs at it with --config.teacher_checkpoint (read back, never trained; the import records
the model, class count and image size of --config, which the runs must share):
  python -m qkd_jax.import_teacher --weights=resnet18-f37072fd.pth --model=resnet18 \
    --out=/tmp/in_r18_teacher --config=configs/imagenet_resnet18.py:sqakd,w4a4
  python -m qkd_jax.main --config=configs/imagenet_resnet18.py:sqakd,w4a4 --workdir=/tmp/in_r18_sqakd_w4a4 \
    --config.teacher_checkpoint=/tmp/in_r18_teacher
Or train the teacher once with ':fp' and point the student runs at WORKDIR/teacher; without
teacher_checkpoint every run trains its own teacher first.

Run (with the imported teacher; or train it: python -m qkd_jax.main --config=configs/imagenet_resnet18.py:fp
--workdir=/tmp/in_r18_fp, then --config.teacher_checkpoint=/tmp/in_r18_fp/teacher):
  for o in qat sqakd qkd; do for b in w2a2 w3a3 w4a4; do
    python -m qkd_jax.main --config=configs/imagenet_resnet18.py:$o,$b --workdir=/tmp/in_r18_${o}_$b \
      --config.teacher_checkpoint=/tmp/in_r18_teacher
  done; done
"""

from qkd_jax.run import recipes as common

# The paper's settings (each is a valid ARG; other bit widths are accepted too).
VARIANTS = common.IMAGENET_VARIANTS


def get_config(arg: str = ""):
    return common.imagenet_config(common.imagenet_variant(arg, VARIANTS, squat=True), model="resnet18")
