"""Hand-written torch (float64, NCHW) versions of the released auxiliary modules, the independent
reference of the feature-criterion tests, and helpers copying flax weights into them.

Transcribed from kaiqi123/SQAKD CIFAR/models/util.py (ConvReg, LinearEmbed, Embed, Paraphraser,
Translator), CIFAR/distiller_zoo/FT.py,
CIFAR/distiller_zoo/{FitNet,CC,VID}.py and CIFAR/crd/{criterion,memory}.py.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def t(x) -> torch.Tensor:
    """A float64 leaf tensor (gradients recorded) from an array."""
    return torch.tensor(np.asarray(x, np.float64), requires_grad=True)


def param(x) -> nn.Parameter:
    """A float64 torch parameter holding the array ``x`` (flax weights copied into a module)."""
    return nn.Parameter(torch.tensor(np.asarray(x, np.float64)))


def nchw(x) -> torch.Tensor:
    """NHWC array -> NCHW float64 leaf tensor."""
    return t(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)))


def conv_weight(kernel) -> nn.Parameter:
    """flax Conv kernel (kh, kw, in, out) -> torch Conv2d weight (out, in, kh, kw)."""
    return param(np.transpose(np.asarray(kernel), (3, 2, 0, 1)))


def conv_transpose_weight(kernel) -> nn.Parameter:
    """flax ConvTranspose kernel (kh, kw, in, out), not flipped -> torch ConvTranspose2d weight
    (in, out, kh, kw), which torch applies flipped."""
    return param(np.transpose(np.asarray(kernel)[::-1, ::-1], (2, 3, 0, 1)).copy())


def linear_weight(kernel) -> nn.Parameter:
    """flax Dense kernel (in, out) -> torch Linear weight (out, in)."""
    return param(np.asarray(kernel).T)


def flax_conv_grad(weight_grad) -> np.ndarray:
    """torch Conv2d weight gradient (out, in, kh, kw) -> flax kernel layout (kh, kw, in, out)."""
    return np.transpose(weight_grad.detach().numpy(), (2, 3, 1, 0))


def flax_conv_transpose_grad(weight_grad) -> np.ndarray:
    """torch ConvTranspose2d weight gradient (in, out, kh, kw) -> flax kernel layout, unflipped."""
    return np.transpose(weight_grad.detach().numpy(), (2, 3, 0, 1))[::-1, ::-1]


class ConvReg(nn.Module):
    """Released ConvReg (use_relu=True), in training mode."""

    def __init__(self, s_shape, t_shape):
        super().__init__()
        _, s_C, s_H, s_W = s_shape
        _, t_C, t_H, t_W = t_shape
        if s_H == 2 * t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=3, stride=2, padding=1)
        elif s_H * 2 == t_H:
            self.conv = nn.ConvTranspose2d(s_C, t_C, kernel_size=4, stride=2, padding=1)
        elif s_H >= t_H:
            self.conv = nn.Conv2d(s_C, t_C, kernel_size=(1 + s_H - t_H, 1 + s_W - t_W))
        else:
            raise NotImplementedError
        self.bn = nn.BatchNorm2d(t_C)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)))


def hint_loss(f_s, f_t):
    return nn.MSELoss()(f_s, f_t)


class LinearEmbed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        return self.linear(x.view(x.shape[0], -1))


def correlation(f_s, f_t):
    delta = torch.abs(f_s - f_t)
    return torch.mean((delta[:-1] * delta[1:]).sum(1))


class VIDLoss(nn.Module):
    def __init__(self, num_input_channels, num_mid_channel, num_target_channels, init_pred_var=5.0, eps=1e-5):
        super().__init__()

        def conv1x1(i, o):
            return nn.Conv2d(i, o, kernel_size=1, padding=0, bias=False)

        self.regressor = nn.Sequential(conv1x1(num_input_channels, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_mid_channel), nn.ReLU(),
                                       conv1x1(num_mid_channel, num_target_channels))
        self.log_scale = nn.Parameter(np.log(np.exp(init_pred_var - eps) - 1.0)
                                      * torch.ones(num_target_channels, dtype=torch.float64))
        self.eps = eps

    def forward(self, input, target):
        s_H, t_H = input.shape[2], target.shape[2]
        if s_H > t_H:
            input = F.adaptive_avg_pool2d(input, (t_H, t_H))
        elif s_H < t_H:
            target = F.adaptive_avg_pool2d(target, (s_H, s_H))
        pred_mean = self.regressor(input)
        pred_var = torch.log(1.0 + torch.exp(self.log_scale)) + self.eps
        pred_var = pred_var.view(1, -1, 1, 1)
        return torch.mean(0.5 * ((pred_mean - target) ** 2 / pred_var + torch.log(pred_var)))


class Embed(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x):
        x = self.linear(x.view(x.shape[0], -1))
        return x.div(x.pow(2).sum(1, keepdim=True).pow(0.5))


def contrast_memory(v1, v2, y, idx, memory_v1, memory_v2, z_v1, z_v2, T, momentum):
    """ContrastMemory.forward with given contrast indices; returns (out_v1, out_v2, Z_v1, Z_v2,
    new memory_v1, new memory_v2). Z < 0 means 'set from this batch'."""
    bsz, dim = v1.shape
    k1 = idx.shape[1]
    out_v2 = torch.exp(torch.bmm(memory_v1[idx.reshape(-1)].detach().view(bsz, k1, dim), v2.view(bsz, dim, 1)) / T)
    out_v1 = torch.exp(torch.bmm(memory_v2[idx.reshape(-1)].detach().view(bsz, k1, dim), v1.view(bsz, dim, 1)) / T)
    n = memory_v1.shape[0]
    if z_v1 < 0:
        z_v1 = (out_v1.mean() * n).item()
    if z_v2 < 0:
        z_v2 = (out_v2.mean() * n).item()
    out_v1, out_v2 = out_v1 / z_v1, out_v2 / z_v2
    with torch.no_grad():
        m1, m2 = memory_v1.clone(), memory_v2.clone()
        for mem, v in ((m1, v1), (m2, v2)):
            pos = mem[y] * momentum + v * (1 - momentum)
            mem.index_copy_(0, y, pos / pos.pow(2).sum(1, keepdim=True).pow(0.5))
    return out_v1, out_v2, z_v1, z_v2, m1, m2


def contrast_loss(x, n_data, eps=1e-7):
    bsz, m = x.shape[0], x.size(1) - 1
    pn = 1 / float(n_data)
    p_pos = x.select(1, 0)
    log_d1 = torch.div(p_pos, p_pos.add(m * pn + eps)).log_()
    p_neg = x.narrow(1, 1, m)
    log_d0 = torch.div(p_neg.clone().fill_(m * pn), p_neg.add(m * pn + eps)).log_()
    return -(log_d1.sum(0) + log_d0.view(-1, 1).sum(0)) / bsz


class Paraphraser(nn.Module):
    """Released Paraphraser (k=0.5, use_bn=False)."""

    def __init__(self, t_shape, k=0.5):
        super().__init__()
        in_channel = t_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1), nn.LeakyReLU(0.1),
        )
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(out_channel, out_channel, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(out_channel, in_channel, 3, 1, 1), nn.LeakyReLU(0.1),
            nn.ConvTranspose2d(in_channel, in_channel, 3, 1, 1), nn.LeakyReLU(0.1),
        )

    def forward(self, f_s, is_factor=False):
        factor = self.encoder(f_s)
        if is_factor:
            return factor
        return factor, self.decoder(factor)


class Translator(nn.Module):
    """Released Translator (k=0.5, use_bn=True), in training mode."""

    def __init__(self, s_shape, t_shape, k=0.5):
        super().__init__()
        in_channel = s_shape[1]
        out_channel = int(t_shape[1] * k)
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channel, in_channel, 3, 1, 1), nn.BatchNorm2d(in_channel), nn.LeakyReLU(0.1),
            nn.Conv2d(in_channel, out_channel, 3, 1, 1), nn.BatchNorm2d(out_channel), nn.LeakyReLU(0.1),
            nn.Conv2d(out_channel, out_channel, 3, 1, 1), nn.BatchNorm2d(out_channel), nn.LeakyReLU(0.1),
        )

    def forward(self, f_s):
        return self.encoder(f_s)


def factor_transfer_loss(f_s, f_t, p1=2, p2=1):
    """Released FactorTransfer.factor_loss (equal heights)."""
    def factor(f):
        return F.normalize(f.pow(p1).mean(1).view(f.size(0), -1))
    if p2 == 1:
        return (factor(f_s) - factor(f_t)).abs().mean()
    return (factor(f_s) - factor(f_t)).pow(p2).mean()
