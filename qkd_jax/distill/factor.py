"""Factor Transfer ('factor'): a trainable translator on the student, a frozen paraphraser on the teacher.

Released: kaiqi123/SQAKD CIFAR/utils_distill.py ('factor'): ``Paraphraser(feat_t[-2].shape)`` is
first trained alone to reconstruct the frozen teacher's ``feat_t[-2]`` (``init``, MSE); then
``Translator(feat_s[-2].shape, feat_t[-2].shape)`` trains with the student and the loss is
``FactorTransfer()(translator(feat_s[-2]), paraphraser(feat_t[-2], is_factor=True))``
(CIFAR/distiller_zoo/FT.py), the paraphraser in eval mode and not among the optimised parameters.
Here the translator is the auxiliary ``params``; the paraphraser's weights live in the auxiliary
``state`` (never differentiated, never updated by this loss), with the translator's BatchNorm
running averages (kept, as FitNet's, but never read: the translator's BatchNorm runs in training mode).
:meth:`init` draws a fresh paraphraser; the trained one replaces ``state['paraphraser']``.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax

from qkd_jax.distill import feature_losses as fl
from qkd_jax.distill.feature_kd import FeatureKD, register_feature
from qkd_jax.distill.heads import Paraphraser, Translator


def paraphraser_loss(params, f_t) -> jax.Array:
    """The paraphraser's training loss: MSE between its reconstruction of ``f_t`` and ``f_t``
    (released ``init`` with ``nn.MSELoss()``)."""
    _, rec = Paraphraser().apply({"params": params}, f_t)
    return fl.hint(rec, f_t)


@register_feature
@dataclasses.dataclass(frozen=True)
class FactorTransfer(FeatureKD):
    """'factor': :func:`feature_losses.factor_transfer` (p1 = 2, p2 = 1) between
    ``Translator(feats_s[-2])`` and the paraphraser's factor of ``feats_t[-2]``.
    Params: {'translator'}; state: {'batch_stats', 'paraphraser'}."""

    name: ClassVar[str] = "factor"

    @staticmethod
    def _maps(feats_s, feats_t):
        if len(feats_s) < 2 or len(feats_t) < 2:
            raise ValueError("factor needs at least two features (the last stage map and the embedding).")
        f_s, f_t = feats_s[-2], feats_t[-2]
        if f_s.ndim != 4 or f_t.ndim != 4:
            raise ValueError(f"factor uses feats[-2], which must be a 4-d NHWC stage map, got {f_s.shape} "
                             f"and {f_t.shape}.")
        return f_s, f_t

    def init(self, rng, feats_s, feats_t, *, num_examples, dataset_labels=None):
        f_s, f_t = self._maps(feats_s, feats_t)
        k_t, k_p = jax.random.split(rng)
        translator = Translator(f_t.shape[-1]).init(k_t, f_s)
        paraphraser = Paraphraser().init(k_p, f_t)
        return {"params": {"translator": translator["params"]},
                "state": {"batch_stats": translator["batch_stats"], "paraphraser": paraphraser["params"]}}

    def loss(self, params, state, feats_s, feats_t, *, rng, index=None, axis_name=None):
        f_s, f_t = self._maps(feats_s, feats_t)
        factor_s, mutated = Translator(f_t.shape[-1], axis_name=axis_name).apply(
            {"params": params["translator"], "batch_stats": state["batch_stats"]}, f_s, mutable=["batch_stats"])
        factor_t = Paraphraser().apply({"params": jax.lax.stop_gradient(state["paraphraser"])}, f_t,
                                       is_factor=True)
        new_state = {"batch_stats": mutated["batch_stats"], "paraphraser": state["paraphraser"]}
        return fl.factor_transfer(factor_s, factor_t), new_state
