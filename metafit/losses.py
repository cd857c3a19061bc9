"""Task losses with a leading task dimension: one value per task of a meta-batch.

:mod:`metafit.functional` re-exports them; the ``"mlp"`` strategy's analytic gradients
recognise these two functions by identity.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["mse_loss", "cross_entropy_loss", "LOSSES"]


def mse_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean squared error per task.

    Parameters
    ----------
    outputs : Tensor of shape (T, n, n_outputs)
    y : Tensor of shape (T, n) or (T, n, n_outputs)
        With 2-D targets, only the first output column is compared.

    Returns
    -------
    Tensor of shape (T,)
    """
    if y.dim() == 2:
        outputs = outputs[..., 0]
    return (outputs - y).pow(2).flatten(1).mean(1)


def cross_entropy_loss(outputs: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy per task; ``y`` holds class indices of shape (T, n)."""
    T, n = y.shape
    return F.cross_entropy(outputs.reshape(T * n, -1), y.reshape(-1), reduction="none").view(
        T, n
    ).mean(1)


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": mse_loss,
    "cross_entropy": cross_entropy_loss,
}
