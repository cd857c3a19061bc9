"""MAML (Finn et al. 2017), second order, and its first-order approximation."""

from __future__ import annotations

from metafit.algorithms.base import GradientMetaAlgorithm

__all__ = ["MAML", "FOMAML"]


class MAML(GradientMetaAlgorithm):
    """Model-Agnostic Meta-Learning, differentiating through every inner step.

    Memory grows linearly with the number of inner steps, since every step's graph is kept
    for the second derivatives.

    Parameters
    ----------
    checkpoint : bool, default=False
        Gradient checkpointing of the inner loop: keep only each step's adapted
        parameters and recompute the step in the backward pass. The same meta-gradient;
        the memory of the parameters per step instead of their activations, for about
        one more forward and inner gradient per step.
    """

    name = "maml"
    first_order = False

    def __init__(self, checkpoint: bool = False):
        if not isinstance(checkpoint, bool):
            raise ValueError(f"checkpoint must be True or False, got {checkpoint!r}.")
        self.checkpoint = checkpoint

    def get_config(self):
        return {"checkpoint": self.checkpoint} if self.checkpoint else {}


class FOMAML(GradientMetaAlgorithm):
    """First-order MAML: the inner gradients are treated as constants.

    The meta-gradient is the query gradient at the adapted parameters, applied to the
    initialization; no graph is kept across inner steps, so memory is flat in their number.
    """

    name = "fomaml"
    first_order = True
