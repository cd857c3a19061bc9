"""Meta-SGD (Li et al. 2017): meta-learned per-parameter inner learning rates."""

from __future__ import annotations

import torch

from metafit.algorithms.base import GradientMetaAlgorithm

__all__ = ["MetaSGD"]

_PREFIX = "inner_lr."


class MetaSGD(GradientMetaAlgorithm):
    """MAML with one learned inner learning rate per parameter entry.

    The rates start at the estimator's ``inner_lr`` and are meta-learned jointly with the
    initialization (second order). ``fit`` adapts with the learned rates; ``inner_lr`` only
    sets their starting value.
    """

    name = "metasgd"
    first_order = False

    def extra_parameters(self, learner):
        return {
            _PREFIX + name: torch.full_like(p, float(learner.inner_lr)).requires_grad_(True)
            for name, p in learner.module.named_parameters()
        }

    def inner_lr(self, learner, base=None):
        return {name[len(_PREFIX) :]: value for name, value in learner.extras.items()}
