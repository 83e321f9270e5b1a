"""The demo: SQAKD vs plain QAT at W2A2 on the bundled handwritten digits (scikit-learn).

Phases: teacher (FP ResNet-20, cross-entropy) -> calibrate (copy into the quantized student,
initialise the EWGS intervals on one batch) -> sqakd (KL to the frozen teacher, no labels) and
qat (the same student from the same calibration, cross-entropy with labels).

    python -m qkd_jax.main --config=configs/digits_demo.py --workdir=/tmp/qkd_digits
    python -m qkd_jax.main --config=configs/digits_demo.py --workdir=/tmp/qkd_digits_w1 \
        --config.quant.w_bits=1 --config.quant.a_bits=1
"""

from __future__ import annotations

from qkd_jax.run.config_schema import base_config, optimizer_config, phase


def get_config():
    c = base_config()
    c.dataset.name = "qkd_digits"
    c.dataset.eval_batch_size = 360
    c.model.name = "resnet20"
    c.quant.method = "interval"
    c.quant.preset = "sqakd_cifar"
    c.quant.w_bits = 2
    c.quant.a_bits = 2
    c.quant.hessian_every_epochs = 4
    c.quant.hessian_batches = 2
    c.quant.hessian_batch_size = 128
    # With --config.quant.estimator=hessian: one joint probe over all layers, about 30 times cheaper
    # on CPU than the released per-layer probe of the paper configs (docs/method.md section 5).
    c.quant.hessian_probe = "joint"
    c.log_every_steps = 50
    c.checkpoint_every_steps = 200
    student_weights = optimizer_config(optimizer="adam", learning_rate=1e-3, weight_decay=1e-4,
                                       schedule="cosine_epoch")
    student_quant = optimizer_config(optimizer="adam", learning_rate=1e-4, schedule="cosine_epoch")
    c.phase_order = "teacher,calibrate,sqakd,qat"
    c.phases.teacher = phase(
        "teacher", objective="task", epochs=12, batch_size=64,
        weights=optimizer_config(optimizer="sgd", learning_rate=0.05, momentum=0.9,
                                 nesterov=True, weight_decay=5e-4, schedule="cosine_step"),
        eval_every_epochs=4,
    )
    c.phases.calibrate = phase("calibrate", init_from="teacher", batch_size=256)
    c.phases.sqakd = phase(
        "student", objective="sqakd", alpha=1.0, temperature=4.0, init_from="calibrate",
        teacher_from="teacher", epochs=12, batch_size=64, weights=student_weights,
        quant_params=student_quant, eval_every_epochs=4,
    )
    c.phases.qat = phase(
        "student", objective="task", init_from="calibrate", epochs=12, batch_size=64,
        weights=student_weights, quant_params=student_quant, eval_every_epochs=4,
    )
    return c
