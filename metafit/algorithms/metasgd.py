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

    def extra_parameters(self, ctx):
        return {
            _PREFIX + name: torch.full_like(p, float(ctx.inner_lr)).requires_grad_(True)
            for name, p in ctx.module.named_parameters()
        }

    @property
    def uses_inner_lr(self) -> bool:
        return False  # every parameter has its own learned rate

    def inner_lr(self, ctx, base=None, steps=None):
        return {name[len(_PREFIX) :]: value for name, value in ctx.extras.items()}

    def fit_warning(self, fit_steps, trained_steps):
        if trained_steps is None or fit_steps <= trained_steps:
            return None
        return (
            f"fit adapts with inner_steps={fit_steps}, but this Meta-SGD initialization was "
            f"meta-trained with {trained_steps} inner step(s): its learned per-parameter "
            "learning rates are tuned for that many steps, and more steps often diverge "
            "(inf/nan). Set inner_steps (or meta_inner_steps when meta-fitting) to "
            f"{trained_steps} or fewer."
        )
