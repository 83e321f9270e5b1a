"""Hand-written torch (float64) transcription of the released SQuaT loss, the independent reference
of tests/distill/test_squat.py.

Transcribed from lcdbsa522/SQuaT CIFAR/ResNet: models/custom_modules.py (EWGS_discretizer,
QConv.act_quantization: the student's tap, `saved_qact`, before output_scale),
models/feature_quant_module.py (FeatureQuantizer: the teacher's tap quantized with the student's
lA, uA copied as floats, under torch.no_grad in train_quant_distill.py), distiller_zoo/KD.py
(DistillKL) and the loss line of train_quant_distill.py
(`kd_gamma * CE + kd_beta * KL + kd_gamma * MSE`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class EWGSDiscretizer(torch.autograd.Function):
    """Released EWGS_discretizer: round to num_levels in [0, 1]; backward g + delta |g| (x - x_q)."""

    @staticmethod
    def forward(ctx, x_in, num_levels, delta):
        x_out = torch.round(x_in * (num_levels - 1)) / (num_levels - 1)
        ctx.delta = delta
        ctx.save_for_backward(x_in - x_out)
        return x_out

    @staticmethod
    def backward(ctx, g):
        (diff,) = ctx.saved_tensors
        return g + g * ctx.delta * torch.sign(g) * diff, None, None


def student_tap(x: torch.Tensor, lA: torch.Tensor, uA: torch.Tensor, levels: int, delta: float) -> torch.Tensor:
    """QConv.act_quantization of the last conv (its saved_qact, differentiable)."""
    x = ((x - lA) / (uA - lA)).clamp(min=0, max=1)
    return EWGSDiscretizer.apply(x, levels, delta)


def teacher_tap(x: torch.Tensor, lA: float, uA: float, levels: int) -> torch.Tensor:
    """FeatureQuantizer.forward with use_student_quant_params (lF, uF filled from lA.item(), uA.item()),
    run under torch.no_grad."""
    with torch.no_grad():
        lF, uF = torch.tensor(lA, dtype=x.dtype), torch.tensor(uA, dtype=x.dtype)
        x = ((x - lF) / (uF - lF)).clamp(min=0, max=1)
        return EWGSDiscretizer.apply(x, levels, 0.0)


def distill_kl(y_s: torch.Tensor, y_t: torch.Tensor, T: float) -> torch.Tensor:
    """Released DistillKL(T)."""
    p_s = F.log_softmax(y_s / T, dim=1)
    p_t = F.softmax(y_t / T, dim=1)
    return F.kl_div(p_s, p_t, reduction="sum") * (T**2) / y_s.shape[0]


def squat_loss(logit_s, logit_t, labels, x_s, x_t, lA, uA, *, levels: int, delta: float, T: float = 4.0,
               kd_gamma: float = 1.0, kd_beta: float = 1.0, ce: bool = True) -> torch.Tensor:
    """The CIFAR script's loss; ``ce=False`` drops the CE term (the ImageNet script's kd_alpha 0)."""
    fd_map_s = student_tap(x_s, lA, uA, levels, delta)
    fd_map_t = teacher_tap(x_t, lA.item(), uA.item(), levels)
    loss_cls = F.cross_entropy(logit_s, labels) if ce else 0.0
    loss_div = distill_kl(logit_s, logit_t, T)
    loss_fd = F.mse_loss(fd_map_s, fd_map_t)
    return kd_gamma * loss_cls + kd_beta * loss_div + kd_gamma * loss_fd
