"""FitNet hints: a trainable convolutional regressor maps one student map onto the teacher's.

Released: kaiqi123/SQAKD CIFAR/utils_distill.py ('hint'): ``ConvReg(feat_s[hint_layer].shape,
feat_t[hint_layer].shape)`` trained with the student, loss = MSE(ConvReg(f_s), f_t)
(CIFAR/distiller_zoo/FitNet.py). The regressor's BatchNorm always runs in training mode
(batch statistics); its running averages are kept in the auxiliary ``state`` and updated each
step (flax's biased batch variance, torch's is unbiased), but no loss ever reads them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import ConvReg


@register_feature
@dataclasses.dataclass(frozen=True)
class FitNet(FeatureKD):
    """'hint': :func:`feature_losses.hint` between ``ConvReg(feats_s[hint_layer])`` and
    ``feats_t[hint_layer]`` (default 2: the second stage's output of a CIFAR ResNet, whose list
    starts with the stem). Params: {'regressor'}; state: {'batch_stats'} of its BatchNorm."""

    name: ClassVar[str] = "hint"
    hint_layer: int = 2

    def _regressor(self, feats_s, feats_t, axis_name=None) -> ConvReg:
        self._check_lengths(feats_s, feats_t, 1)
        if not -len(feats_s) <= self.hint_layer < len(feats_s):
            raise ValueError(f"hint_layer={self.hint_layer} is out of range for {len(feats_s)} features; "
                             f"choose 0..{len(feats_s) - 1}.")
        f_s, f_t = feats_s[self.hint_layer], feats_t[self.hint_layer]
        if f_s.ndim != 4 or f_t.ndim != 4:
            raise ValueError(f"hint_layer={self.hint_layer} selects a non-spatial feature ({f_s.shape}); "
                             f"choose a stage output (a 4-d NHWC map).")
        return ConvReg(tuple(f_t.shape[1:]), axis_name=axis_name)

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None):
        variables = self._regressor(feats_s, feats_t).init(rng, feats_s[self.hint_layer])
        return {"params": {"regressor": variables["params"]},
                "state": {"batch_stats": variables["batch_stats"]}}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        module = self._regressor(feats_s, feats_t, axis_name)
        regressed, mutated = module.apply(
            {"params": params["regressor"], "batch_stats": state["batch_stats"]},
            feats_s[self.hint_layer], mutable=["batch_stats"])
        return fl.hint(regressed, feats_t[self.hint_layer]), {"batch_stats": mutated["batch_stats"]}
