"""ANIL (Raghu et al. 2020): Almost No Inner Loop."""

from __future__ import annotations

from metafit.algorithms.base import GradientMetaAlgorithm
from metafit.functional import head_parameter_names

__all__ = ["ANIL"]


class ANIL(GradientMetaAlgorithm):
    """MAML whose inner loop adapts only the head (the last layer).

    The body is meta-learned by the outer loop alone and stays fixed during adaptation,
    both in meta-training and in ``fit``. Second order by default; the head is small, so
    the second-order cost is low.
    """

    name = "anil"
    first_order = False

    def adapted_names(self, ctx):
        return head_parameter_names(ctx.module)
