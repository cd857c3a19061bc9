"""MAML (Finn et al. 2017), second order, and its first-order approximation."""

from __future__ import annotations

from metafit.algorithms.base import GradientMetaAlgorithm

__all__ = ["MAML", "FOMAML"]


class MAML(GradientMetaAlgorithm):
    """Model-Agnostic Meta-Learning, differentiating through every inner step.

    Memory grows linearly with the number of inner steps, since every step's graph is kept
    for the second derivatives.
    """

    name = "maml"
    first_order = False


class FOMAML(GradientMetaAlgorithm):
    """First-order MAML: the inner gradients are treated as constants.

    The meta-gradient is the query gradient at the adapted parameters, applied to the
    initialization; no graph is kept across inner steps, so memory is flat in their number.
    """

    name = "fomaml"
    first_order = True
