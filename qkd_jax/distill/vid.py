"""Variational information distillation (VID) with a trainable regressor and variance per stage.

Released: kaiqi123/SQAKD CIFAR/utils_distill.py ('vid'): one ``VIDLoss(s_C, t_C, t_C)`` per pair
of stage outputs ``feat[1:-1]``, all trained with the student; the losses are summed
(CIFAR/distiller_zoo/VID.py). Each has a regressor conv1x1(s_C, t_C) - ReLU - conv1x1(t_C, t_C)
- ReLU - conv1x1(t_C, t_C) (no biases) and a per-channel ``log_scale`` initialised to
:func:`feature_losses.vid_log_scale_init` (softplus^-1(5 - 1e-5)). Spatial matching pools the
taller side to the other's height: a taller student map before the regressor, a taller teacher
map (the target) before the likelihood.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import VIDRegressor


@register_feature
@dataclasses.dataclass(frozen=True)
class VID(FeatureKD):
    """'vid': sum over stage pairs of :func:`feature_losses.vid` of the regressed (pooled) student
    map against the (pooled) teacher map. Params: {'<stage>': {'regressor', 'log_scale'}}."""

    name: ClassVar[str] = "vid"
    init_pred_var: float = 5.0
    eps: float = 1e-5

    def _pairs(self, feats_s, feats_t):
        self._check_lengths(feats_s, feats_t, 3)
        return list(zip(feats_s[1:-1], feats_t[1:-1]))

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None):
        params = {}
        pairs = self._pairs(feats_s, feats_t)
        for i, (key, (f_s, f_t)) in enumerate(zip(jax.random.split(rng, len(pairs)), pairs)):
            t_c = f_t.shape[-1]
            f_s, _ = fl.match_spatial(f_s, f_t)
            params[str(i)] = {
                "regressor": VIDRegressor(t_c, t_c).init(key, f_s)["params"],
                "log_scale": jnp.full((t_c,), fl.vid_log_scale_init(self.init_pred_var, self.eps), jnp.float32),
            }
        return {"params": params, "state": {}}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        total = 0.0
        for i, (f_s, f_t) in enumerate(self._pairs(feats_s, feats_t)):
            t_c = f_t.shape[-1]
            f_s, f_t = fl.match_spatial(f_s, f_t)
            p = params[str(i)]
            pred = VIDRegressor(t_c, t_c).apply({"params": p["regressor"]}, f_s)
            total = total + fl.vid(pred, f_t, p["log_scale"], self.eps)
        return total, state
