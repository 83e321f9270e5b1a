"""Correlation congruence (CC) with trainable linear embeddings of both networks.

Released: kaiqi123/SQAKD CIFAR/utils_distill.py ('correlation'): ``LinearEmbed(dim, feat_dim)``
heads on the student's and the teacher's ``feat[-1]`` (the pre-logit embedding), both trained
with the student; loss = CIFAR/distiller_zoo/CC.py on the two head outputs. The teacher network
stays frozen, but the gradient reaches the teacher-side head.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import LinearEmbed


@register_feature
@dataclasses.dataclass(frozen=True)
class Correlation(FeatureKD):
    """'correlation': :func:`feature_losses.correlation` (``teacher_grad=True``) between
    ``LinearEmbed(feat_dim)`` of each network's ``feat[-1]``. Params: {'student', 'teacher'}."""

    name: ClassVar[str] = "correlation"
    feat_dim: int = 128

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None):
        self._check_lengths(feats_s, feats_t, 1)
        head = LinearEmbed(self.feat_dim)
        k_s, k_t = jax.random.split(rng)
        return {"params": {"student": head.init(k_s, feats_s[-1])["params"],
                           "teacher": head.init(k_t, feats_t[-1])["params"]}, "state": {}}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        self._check_lengths(feats_s, feats_t, 1)
        head = LinearEmbed(self.feat_dim)
        e_s = head.apply({"params": params["student"]}, feats_s[-1])
        e_t = head.apply({"params": params["teacher"]}, feats_t[-1])
        return fl.correlation(e_s, e_t, teacher_grad=True), state
